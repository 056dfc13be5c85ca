//! The `:authority` that gRPC clients send on a unix socket, made acceptable to h2.
//!
//! grpc-core (Python, C++, Ruby, PHP clients, so py-spiffe) and grpc-java put the socket path
//! in `:authority` when they dial a unix socket (`%2Frun%2Fmeshid%2Fagent.sock`, or the path
//! itself). That is no valid authority, and h2, under hyper and tonic, resets every such stream
//! with PROTOCOL_ERROR (hyperium/h2#487, grpc/grpc#38142): those clients could never use a
//! Workload API served by h2. Go clients send `localhost` and are unaffected.
//!
//! [`UdsAuthority`] sits between a unix connection and hyper. It passes every byte through
//! unchanged except the header blocks of HEADERS frames (with their CONTINUATION frames): those
//! it decodes with the client's HPACK state, replaces an `:authority` that does not parse as
//! one with `localhost`, and encodes again with an HPACK state of its own toward h2, as one
//! HEADERS frame (and CONTINUATION frames when longer than the default frame size). Padding and
//! the deprecated priority fields are dropped. A header block that does not decode, or frames
//! out of order within one, end the connection, as h2 would have.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's initial value, which the servers of `serve.rs` keep: no client
/// frame may be larger, and ours are not. (Raising it there means raising it here.)
const MAX_FRAME: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE's initial value, which the servers of `serve.rs` keep: what the
/// client's encoder may use (our decoder follows it), and what h2's decoder allows ours.
const TABLE_SIZE: usize = 4096;

/// A header block being received: HEADERS then CONTINUATION frames of one stream.
struct Block {
    stream: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

enum State {
    /// Until the client preface is seen (a connection that is not HTTP/2 passes untouched).
    Preface,
    Frames,
    PassThrough,
}

/// A connection whose request header blocks get a valid `:authority` (see the module doc).
pub struct UdsAuthority<S> {
    inner: S,
    /// Read from the client, not yet handled.
    raw: BytesMut,
    /// Handled, for hyper to read.
    ready: BytesMut,
    state: State,
    block: Option<Block>,
    /// CONTINUATION frames of the block being received (empty ones count too).
    continuations: usize,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// The largest header list accepted (name + value + 32 per field, as RFC 9113 counts).
    max_header_list: usize,
    eof: bool,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl<S> UdsAuthority<S> {
    pub fn new(inner: S, max_header_list: usize) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            state: State::Preface,
            block: None,
            continuations: 0,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            max_header_list,
            eof: false,
        }
    }

    /// Move what can be handled from `raw` to `ready`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::PassThrough => {
                    let all = self.raw.split();
                    self.ready.unsplit(all);
                    return Ok(());
                }
                State::Preface => {
                    let n = self.raw.len().min(PREFACE.len());
                    if self.raw[..n] != PREFACE[..n] {
                        self.state = State::PassThrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    let preface = self.raw.split_to(PREFACE.len());
                    self.ready.unsplit(preface);
                    self.state = State::Frames;
                }
                State::Frames => {
                    if self.raw.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len = usize::from(self.raw[0]) << 16
                        | usize::from(self.raw[1]) << 8
                        | usize::from(self.raw[2]);
                    if len > MAX_FRAME {
                        return Err(invalid(format!(
                            "HTTP/2 frame of {len} bytes (FRAME_SIZE_ERROR)"
                        )));
                    }
                    if self.raw.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let frame = self.raw.split_to(FRAME_HEADER + len);
                    self.frame(frame)?;
                }
            }
        }
    }

    fn frame(&mut self, frame: BytesMut) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        if let Some(block) = &mut self.block {
            if kind != CONTINUATION || stream != block.stream {
                return Err(invalid("HTTP/2 header block interrupted by another frame"));
            }
            block.fragment.extend_from_slice(payload);
            self.continuations += 1;
            // Empty CONTINUATION frames add nothing: count them as well.
            if block.fragment.len() > self.max_header_list
                || self.continuations > self.max_header_list / MAX_FRAME + 2
            {
                return Err(invalid("HTTP/2 header block too large"));
            }
            if flags & END_HEADERS != 0
                && let Some(block) = self.block.take()
            {
                self.reencode(block)?;
            }
            return Ok(());
        }
        if kind != HEADERS {
            // CONTINUATION without HEADERS and everything else: h2's to judge.
            self.ready.unsplit(frame);
            return Ok(());
        }
        let mut fragment = payload;
        if flags & PADDED != 0 {
            let (&pad, rest) = fragment
                .split_first()
                .ok_or_else(|| invalid("HEADERS frame without its pad length"))?;
            let keep = rest
                .len()
                .checked_sub(usize::from(pad))
                .ok_or_else(|| invalid("HEADERS frame padding longer than the frame"))?;
            fragment = &rest[..keep];
        }
        if flags & PRIORITY != 0 {
            fragment = fragment
                .get(5..)
                .ok_or_else(|| invalid("HEADERS frame too short for its priority"))?;
        }
        if fragment.len() > self.max_header_list {
            return Err(invalid("HTTP/2 header block too large"));
        }
        self.continuations = 0;
        let block = Block {
            stream,
            end_stream: flags & END_STREAM != 0,
            fragment: fragment.to_vec(),
        };
        if flags & END_HEADERS != 0 {
            self.reencode(block)
        } else {
            self.block = Some(block);
            Ok(())
        }
    }

    fn reencode(&mut self, block: Block) -> io::Result<()> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let limit = self.max_header_list;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= limit {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| invalid(format!("HPACK: {e}")))?;
        if size > limit {
            return Err(invalid("HTTP/2 header list too large"));
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block still needs its one HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut flags = 0;
            if first && block.end_stream {
                flags |= END_STREAM;
            }
            if next.is_none() {
                flags |= END_HEADERS;
            }
            self.ready.reserve(FRAME_HEADER + chunk.len());
            let len = chunk.len() as u32;
            self.ready.put_slice(&len.to_be_bytes()[1..]);
            self.ready.put_u8(kind);
            self.ready.put_u8(flags);
            self.ready.put_u32(block.stream);
            self.ready.put_slice(chunk);
            first = false;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for UdsAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.raw.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UdsAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// Frames out of `bytes` (after the preface): (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut fixed = UdsAuthority::new(server, 64 * 1024);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"workload.spiffe.io", b"true".to_vec()),
        ]
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_across_requests_that_share_hpack_state() {
        // The client's encoder indexes the authority on the first request and refers to it on
        // the second: the rewrite must follow the client's table.
        let mut client = loona_hpack::Encoder::new();
        let path = "%2Frun%2Fmeshid%2Fagent.sock";
        let enc = |c: &mut loona_hpack::Encoder<'_>, h: &[(&'static [u8], Vec<u8>)]| {
            c.encode(h.iter().map(|(n, v)| (*n, v.as_slice())))
        };
        let first = enc(&mut client, &request(path));
        let second = enc(&mut client, &request(path));
        assert!(
            second.len() < first.len(),
            "the second block uses the dynamic table"
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // First request: padded, with priority, split over a CONTINUATION.
        let (a, b) = first.split_at(first.len() / 2);
        let mut padded = vec![3u8];
        padded.extend([0, 0, 0, 0, 16]);
        padded.extend(a);
        padded.extend([0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let out = frames(&through(input).await.unwrap());
        let kinds: Vec<(u8, u8, u32)> = out.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            vec![
                (0x4, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (0x0, END_STREAM, 1),
                (HEADERS, END_HEADERS | END_STREAM, 3),
            ]
        );
        assert_eq!(out[2].3, b"\0\0\0\0\0", "DATA passes untouched");
        // What h2 sees, decoded with one HPACK state as h2 keeps it.
        let mut server = loona_hpack::Decoder::new();
        for f in [&out[1], &out[3]] {
            let fields = server.decode(&f.3).unwrap();
            let get = |n: &[u8]| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            assert_eq!(get(b":authority").unwrap(), b"localhost");
            assert_eq!(get(b":path").unwrap(), b"/SpiffeWorkloadAPI/FetchX509SVID");
            assert_eq!(get(b"workload.spiffe.io").unwrap(), b"true");
            assert_eq!(fields.len(), 5);
        }
    }

    #[tokio::test]
    async fn a_valid_authority_and_http1_pass_unchanged() {
        let mut client = loona_hpack::Encoder::new();
        let block = client.encode(request("localhost").iter().map(|(n, v)| (*n, v.as_slice())));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = frames(&through(input).await.unwrap());
        let fields = loona_hpack::Decoder::new().decode(&out[0].3).unwrap();
        assert!(fields.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(http1.clone()).await.unwrap(), http1);
    }

    #[tokio::test]
    async fn garbage_header_blocks_and_interrupted_blocks_end_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert_eq!(
            through(input).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        assert!(through(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]));
        assert!(through(input).await.is_err());
        // A frame larger than the frame size h2 allows, and a flood of empty CONTINUATIONs.
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x0, 0, 1, &vec![0; MAX_FRAME + 1]));
        assert!(through(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..100 {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        assert!(through(input).await.is_err());
        // A block that decodes to more than the header list bound.
        let mut client = loona_hpack::Encoder::new();
        let big = vec![b'a'; 3000];
        let block = client.encode(vec![(b"x-big".as_slice(), big.as_slice()); 30]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        assert!(through(input).await.is_err());
    }
}
