//! Unit tests of the hub.
use super::*;
