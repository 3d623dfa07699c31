//! Key files, read the same way by the server (`--hmac-key-file`), `send`, the
//! bench and the examples (the Python one mirrors it): the key is the file's
//! bytes with one trailing line ending removed, `\n` or `\r\n`, so a key file
//! written on Windows or by `echo` works on both ends.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {0} is empty")]
    Empty(PathBuf),
}

/// `bytes` without one trailing `\n` or `\r\n`.
pub fn strip_line_ending(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

/// Reads a key file; an empty key is an error.
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let key = strip_line_ending(bytes);
    if key.is_empty() {
        return Err(KeyFileError::Empty(path.to_owned()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_line_ending_is_removed_lf_or_crlf() {
        assert_eq!(strip_line_ending(b"secret\n".to_vec()), b"secret");
        assert_eq!(strip_line_ending(b"secret\r\n".to_vec()), b"secret");
        assert_eq!(strip_line_ending(b"secret\n\n".to_vec()), b"secret\n");
        assert_eq!(strip_line_ending(b"secret\r".to_vec()), b"secret\r");
        assert_eq!(strip_line_ending(b"secret".to_vec()), b"secret");
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("pi-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"\r\n").expect("write");
        assert!(matches!(read_key_file(&empty), Err(KeyFileError::Empty(_))));
        assert!(matches!(
            read_key_file(&dir.join("missing")),
            Err(KeyFileError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
