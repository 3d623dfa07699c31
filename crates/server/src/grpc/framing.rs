//! gRPC message framing over HTTP/2 for the `Packets` methods, which this
//! server reads and writes itself (see the `grpc` module for why).
//!
//! Requests: a message is a 5-byte prefix (compressed flag, big-endian length)
//! and that many protobuf bytes. `MessageReader` takes them off the request
//! body chunk by chunk: a message that lies inside one HTTP/2 chunk is a
//! slice of it (no copy), and only a message split across chunks is copied
//! together. It refuses an oversized or malformed one with
//! `INVALID_ARGUMENT` (never `OUT_OF_RANGE` or `INTERNAL`), and can charge
//! what it buffers to the ingest budget; while it waits for budget it does not
//! poll the body, so HTTP/2 flow control paces the client.
//!
//! Responses: `ResponseBody` sends each message as the chunks it is made of
//! (for Subscribe: a small prefix and slices shared with the hub), then the
//! `grpc-status` trailers. tonic's codec would copy every message into a
//! per-stream buffer first. The tests check the framing with tonic's client.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{FutureExt, Stream};
use http::{header, HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::{body::Body, Status};

use tokio_util::sync::CancellationToken;

use crate::{
    budget::{Charge, IngestBudget, PartialFrame},
    compression::Encoding,
    wire::GRPC_PREFIX_LEN,
};

/// Messages up to this size may take the ingest budget's reserve.
const SMALL_MESSAGE: usize = 16 * 1024;

pub const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// What the client did wrong, in words it can act on.
fn too_large(length: usize, max: usize, limit: &str) -> Status {
    Status::invalid_argument(format!(
        "request message of {length} bytes is over this server's limit of {max} bytes ({limit})"
    ))
}

/// Reads the request messages of one call.
pub struct MessageReader {
    body: Body,
    /// The unread rest of the newest chunk; whole messages are sliced off it.
    chunk: Bytes,
    /// A message (prefix first) split across chunks, copied together here.
    /// Only ever holds one unfinished message, so `chunk` is empty whenever
    /// this is not.
    assembly: BytesMut,
    /// A chunk taken off the body but not yet charged and buffered.
    unbuffered: Option<Bytes>,
    max_message: usize,
    /// What sets `max_message`, for the error message.
    limit: &'static str,
    end_of_stream: bool,
    /// Budget held for what is buffered (Publish); `None` for small requests.
    charge: Option<Charge>,
    /// With a budget: the budget, the unfinished message registered with
    /// it, and what closes this call's connection if it is evicted.
    budget: Option<(IngestBudget, CancellationToken)>,
    partial: Option<PartialFrame>,
    /// The call's `grpc-encoding`, for messages flagged compressed.
    encoding: Option<Encoding>,
}

impl MessageReader {
    pub fn new(body: Body, max_message: usize, limit: &'static str) -> Self {
        MessageReader {
            body,
            chunk: Bytes::new(),
            assembly: BytesMut::new(),
            unbuffered: None,
            max_message,
            limit,
            end_of_stream: false,
            charge: None,
            budget: None,
            partial: None,
            encoding: None,
        }
    }

    /// Decompresses messages flagged compressed with `encoding` (the call's
    /// negotiated `grpc-encoding`; `None`: such messages are refused).
    pub fn with_encoding(mut self, encoding: Option<Encoding>) -> Self {
        self.encoding = encoding;
        self
    }

    /// Charges what this reader buffers to `budget`; an unfinished message
    /// that goes stale may be evicted by closing the connection (`close`).
    pub fn with_budget(mut self, budget: &IngestBudget, close: CancellationToken) -> Self {
        self.charge = Some(budget.charge());
        self.budget = Some((budget.clone(), close));
        self
    }

    /// The next message, waiting for the client as needed; `None` once the
    /// client has finished sending.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(message) = self.take_buffered()? {
                return Ok(Some(message));
            }
            if self.end_of_stream {
                return match self.buffered() {
                    0 => Ok(None),
                    sent => Err(Status::invalid_argument(format!(
                        "the request ended in the middle of a message ({sent} bytes of it sent)"
                    ))),
                };
            }
            self.read_chunk().await?;
        }
    }

    /// A message that is already here, reading only what HTTP/2 has already
    /// received (never waiting for the client).
    pub fn next_now(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(message) = self.take_buffered()? {
                return Ok(Some(message));
            }
            if self.end_of_stream {
                return Ok(None);
            }
            match self.read_chunk().now_or_never() {
                Some(read) => read?,
                None => return Ok(None),
            }
        }
    }

    /// True once the client has half-closed and every message was taken.
    pub fn is_finished(&self) -> bool {
        self.end_of_stream && self.buffered() == 0
    }

    /// Bytes received and not yet taken as messages.
    fn buffered(&self) -> usize {
        self.chunk.len() + self.assembly.len()
    }

    /// Moves the budget held for the messages taken so far to their batch
    /// (what stays is the charge for the partial message still buffered).
    pub fn charge_for_taken(&mut self) -> Option<Charge> {
        let buffered = self.buffered();
        self.charge.as_mut().map(|charge| {
            let taken = charge.bytes().saturating_sub(buffered);
            charge.split_off(taken)
        })
    }

    /// Registers an unfinished message with the budget, or unregisters.
    fn note_partial(&mut self) {
        match (&self.budget, self.buffered() == 0, &self.partial) {
            (Some((budget, close)), false, None) => {
                self.partial = Some(budget.hold_partial(close.clone()));
            }
            (_, true, Some(_)) => self.partial = None,
            _ => {}
        }
    }

    fn take_buffered(&mut self) -> Result<Option<Bytes>, Status> {
        let message = match self.assembly.is_empty() {
            true => self.slice_from_chunk()?,
            false => self.complete_assembly()?,
        };
        self.note_partial();
        let Some((compressed, message)) = message else {
            return Ok(None);
        };
        match (compressed, self.encoding) {
            (1, Some(encoding)) => encoding
                .decompress(&message, self.max_message, self.limit)
                .map(Some),
            _ => Ok(Some(message)),
        }
    }

    /// A whole message inside `chunk`, sliced off without copying; when only
    /// part of one is there, that part moves to `assembly`.
    fn slice_from_chunk(&mut self) -> Result<Option<(u8, Bytes)>, Status> {
        if self.chunk.len() >= GRPC_PREFIX_LEN {
            let (compressed, length) = self.prefix(&self.chunk[..GRPC_PREFIX_LEN])?;
            if self.chunk.len() >= GRPC_PREFIX_LEN + length {
                self.chunk.advance(GRPC_PREFIX_LEN);
                return Ok(Some((compressed, self.chunk.split_to(length))));
            }
        }
        self.assembly.extend_from_slice(&self.chunk);
        self.chunk.clear();
        Ok(None)
    }

    /// Moves from `chunk` what the message in `assembly` still lacks; the
    /// message once it is whole.
    fn complete_assembly(&mut self) -> Result<Option<(u8, Bytes)>, Status> {
        if self.assembly.len() < GRPC_PREFIX_LEN {
            let take = (GRPC_PREFIX_LEN - self.assembly.len()).min(self.chunk.len());
            self.assembly.extend_from_slice(&self.chunk.split_to(take));
            if self.assembly.len() < GRPC_PREFIX_LEN {
                return Ok(None);
            }
        }
        let (compressed, length) = self.prefix(&self.assembly[..GRPC_PREFIX_LEN])?;
        let missing = GRPC_PREFIX_LEN + length - self.assembly.len();
        let take = missing.min(self.chunk.len());
        self.assembly.extend_from_slice(&self.chunk.split_to(take));
        if take < missing {
            return Ok(None);
        }
        self.assembly.advance(GRPC_PREFIX_LEN);
        Ok(Some((compressed, self.assembly.split().freeze())))
    }

    /// The compressed flag and length of a message prefix, refused if the
    /// flag is unknown or unaccepted, or the length over the limit.
    fn prefix(&self, prefix: &[u8]) -> Result<(u8, usize), Status> {
        let compressed = prefix[0];
        let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        match (compressed, self.encoding) {
            (0, _) | (1, Some(_)) => {}
            (1, None) => {
                return Err(Status::unimplemented(
                    "a compressed request message without a grpc-encoding this server accepts (--compression); send it uncompressed",
                ))
            }
            (other, _) => {
                return Err(Status::invalid_argument(format!(
                    "malformed gRPC message prefix (compressed flag {other})"
                )))
            }
        }
        if length > self.max_message {
            return Err(too_large(length, self.max_message, self.limit));
        }
        Ok((compressed, length))
    }

    /// Buffers the next chunk of the body. Cancel-safe: a chunk taken off
    /// the body is kept until it is charged and buffered.
    async fn read_chunk(&mut self) -> Result<(), Status> {
        if self.unbuffered.is_none() {
            // Waiting for the client from here (see `budget`).
            let _reading = self.partial.as_ref().map(PartialFrame::reading);
            let Some(frame) = self.body.frame().await else {
                self.end_of_stream = true;
                return Ok(());
            };
            let frame = frame?;
            let Ok(data) = frame.into_data() else {
                return Ok(()); // request trailers carry nothing we use
            };
            self.unbuffered = Some(data);
        }
        let len = self.unbuffered.as_ref().map_or(0, Bytes::len);
        // Charged before it is kept; `next` checks the prefix after every
        // chunk, so an oversized message is refused before it accumulates.
        if let Some(charge) = &mut self.charge {
            // Starting a message, or finishing a small one: the reserve may serve.
            let partial = &self.assembly;
            let small = partial.len() < GRPC_PREFIX_LEN
                || u32::from_be_bytes([partial[1], partial[2], partial[3], partial[4]]) as usize
                    <= SMALL_MESSAGE;
            charge.grow(len, small, self.partial.as_ref()).await;
            if let Some(partial) = &self.partial {
                partial.set_bytes(charge.bytes());
            }
        }
        if let Some(data) = self.unbuffered.take() {
            // `take_buffered` leaves `chunk` empty before anyone reads more;
            // should that change, nothing is lost, only copied.
            if !self.chunk.is_empty() {
                self.assembly.extend_from_slice(&self.chunk);
            }
            self.chunk = data;
        }
        Ok(())
    }
}

/// Decodes a request message; a malformed one is the client's error.
pub fn decode<M: prost::Message + Default>(message: Bytes) -> Result<M, Status> {
    M::decode(message)
        .map_err(|error| Status::invalid_argument(format!("malformed request message: {error}")))
}

/// One response message as a single chunk: prefix and protobuf bytes.
pub fn encode<M: prost::Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(GRPC_PREFIX_LEN + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    // A BytesMut grows as needed, so encoding cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

/// The response messages of one call: each a list of chunks sent in order.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<Vec<Bytes>, Status>> + Send>>;

/// A successful call's response: headers, then the messages, then trailers.
pub fn response(headers: HeaderMap, messages: MessageStream) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(ResponseBody {
        messages: Some(messages),
        pending: VecDeque::new(),
        trailers: None,
    }));
    *response.headers_mut() = headers;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

/// A call refused before any message: a trailers-only response.
pub fn refusal(status: Status, headers: HeaderMap) -> http::Response<Body> {
    let mut response = status.into_http::<Body>();
    for (name, value) in headers.iter() {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// The trailers that end a call with `status` (code 0 on success).
fn trailers(status: Option<Status>) -> HeaderMap {
    let status = status.unwrap_or_else(|| Status::ok(""));
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value gets here.
        map.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    map
}

struct ResponseBody {
    messages: Option<MessageStream>,
    pending: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if let Some(trailers) = self.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            let Some(messages) = self.messages.as_mut() else {
                return Poll::Ready(None);
            };
            match messages.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunks))) => self.pending.extend(chunks),
                Poll::Ready(Some(Err(status))) => {
                    self.messages = None;
                    self.trailers = Some(trailers(Some(status)));
                }
                Poll::Ready(None) => {
                    self.messages = None;
                    self.trailers = Some(trailers(None));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.messages.is_none() && self.pending.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::SubscribeRequest;
    use prost::Message;

    fn body_of(chunks: Vec<&[u8]>) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .into_iter()
            .map(|chunk| Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[tokio::test]
    async fn messages_split_at_every_byte_are_reassembled() {
        let first = SubscribeRequest {
            channels: vec![1, 2, 3],
            ..Default::default()
        }
        .encode_to_vec();
        let second = SubscribeRequest {
            from_sequence: Some(9),
            stream_id: "abc".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut wire = framed(&first);
        wire.extend(framed(&second));
        for split in 0..=wire.len() {
            let mut reader =
                MessageReader::new(body_of(vec![&wire[..split], &wire[split..]]), 1024, "test");
            let a: SubscribeRequest =
                decode(reader.next().await.expect("ok").expect("one")).expect("decodes");
            let b: SubscribeRequest =
                decode(reader.next().await.expect("ok").expect("two")).expect("decodes");
            assert_eq!(a.channels, vec![1, 2, 3]);
            assert_eq!((b.from_sequence, b.stream_id.as_str()), (Some(9), "abc"));
            assert!(reader.next().await.expect("ok").is_none());
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any messages cut into any chunks (empty ones, single bytes, a
            /// prefix split in two, many messages in one) come out whole and
            /// in order, whether taken with `next` or `next_now`.
            #[test]
            fn any_chunking_yields_the_messages_sent(
                messages in proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..300), 0..12),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
                eager in any::<bool>(),
            ) {
                let wire: Vec<u8> = messages.iter().flat_map(|message| framed(message)).collect();
                let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(wire.len() + 1)).collect();
                at.extend([0, wire.len()]);
                at.sort_unstable();
                let chunks: Vec<&[u8]> = at.windows(2).map(|pair| &wire[pair[0]..pair[1]]).collect();
                let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                let got = runtime.block_on(async {
                    let mut reader = MessageReader::new(body_of(chunks), 1024, "test");
                    let mut got = Vec::new();
                    loop {
                        if eager {
                            if let Some(message) = reader.next_now().expect("well framed") {
                                got.push(message.to_vec());
                                continue;
                            }
                        }
                        match reader.next().await.expect("well framed") {
                            Some(message) => got.push(message.to_vec()),
                            None => break,
                        }
                    }
                    assert!(reader.is_finished());
                    got
                });
                prop_assert_eq!(got, messages);
            }
        }
    }

    #[tokio::test]
    async fn oversized_malformed_and_truncated_requests_are_invalid_argument() {
        let big = framed(&vec![0u8; 2000]);
        let mut reader = MessageReader::new(body_of(vec![&big[..10]]), 1024, "test");
        assert_eq!(
            reader.next().await.expect_err("too big").code(),
            tonic::Code::InvalidArgument
        );

        let garbage = framed(&[0xFF, 0xFF, 0xFF]);
        let mut reader = MessageReader::new(body_of(vec![&garbage]), 1024, "test");
        let message = reader
            .next()
            .await
            .expect("framing is fine")
            .expect("message");
        let status = decode::<SubscribeRequest>(message).expect_err("not protobuf");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        let mut reader = MessageReader::new(body_of(vec![&framed(b"abc")[..6]]), 1024, "test");
        assert_eq!(
            reader.next().await.expect_err("cut").code(),
            tonic::Code::InvalidArgument
        );

        let mut reader = MessageReader::new(body_of(vec![&[2, 0, 0, 0, 0]]), 1024, "test");
        assert_eq!(
            reader.next().await.expect_err("bad flag").code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_response_is_its_chunks_then_ok_trailers() {
        let message = encode(&SubscribeRequest {
            channels: vec![7],
            ..Default::default()
        });
        let stream: MessageStream = Box::pin(futures::stream::iter(vec![
            Ok(vec![message.slice(..3), message.slice(3..)]),
            Err(Status::resource_exhausted("too slow")),
        ]));
        let body = response(HeaderMap::new(), stream).into_body();
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"8"[..])
        );
        assert_eq!(collected.to_bytes(), message);
    }
}
