//! How a response body is delimited on the wire (RFC 9112 6.3), and the
//! scanner that finds the end of a chunked body: passed through unchanged to
//! an HTTP/1.1 client, or split into its data for hyper (h2 clients).

/// How the body after a response head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, 204 or 304.
    Empty,
    /// `Content-Length` bytes.
    Fixed(u64),
    /// `Transfer-Encoding: chunked`, forwarded as it comes.
    Chunked,
    /// Until the server closes the connection; forwarded chunked.
    Close,
}

/// The chunked body is malformed: the connection cannot be trusted further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

/// Follows a chunked body (sizes, extensions, data, trailers) through the
/// pieces it arrives in, to tell where it ends.
#[derive(Debug, Default)]
pub struct ChunkedScanner {
    state: State,
    /// Data bytes left of the current chunk, or the size being read.
    count: u64,
    /// Hex digits of the size read so far.
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    #[default]
    Size,
    /// After the size: spaces or a `;` extension, up to CR LF.
    Extension,
    /// The LF ending a size line.
    SizeLf,
    Data,
    /// The CR LF after a chunk's data.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line, up to its LF.
    TrailerLine,
    /// The LF of the final empty line.
    EndLf,
    Done,
}

/// Longest chunk size accepted, in hex digits (16: any u64).
const MAX_SIZE_DIGITS: u8 = 16;

/// What the next bytes of a chunked body begin with (see [`ChunkedScanner::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `n` bytes of chunk data.
    Data(usize),
    /// `n` bytes of framing (sizes, extensions, line ends) to skip; 0 when
    /// more bytes are needed.
    Framing(usize),
    /// `n` bytes of the trailer section (after the last chunk: trailer fields,
    /// then a blank line), which goes on.
    Trailer(usize),
    /// The body ends after `n` more bytes of the trailer section.
    End(usize),
}

impl ChunkedScanner {
    /// Scans the next bytes of the body. `Some(n)`: the body ends after the
    /// first `n` bytes of `bytes`.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkError> {
        let (at, end) = self.advance(bytes, false)?;
        Ok(end.then_some(at))
    }

    /// Splits the next bytes of the body into its data, its framing and its
    /// trailer section, one piece at a time.
    pub fn step(&mut self, bytes: &[u8]) -> Result<Step, ChunkError> {
        if self.state == State::Data {
            let take = bytes
                .len()
                .min(usize::try_from(self.count).unwrap_or(usize::MAX));
            self.count -= take as u64;
            if self.count == 0 {
                self.state = State::DataCr;
            }
            return Ok(Step::Data(take));
        }
        let trailer = matches!(
            self.state,
            State::TrailerStart | State::TrailerLine | State::EndLf | State::Done
        );
        let (at, end) = self.advance(bytes, true)?;
        Ok(match (end, trailer) {
            (true, _) => Step::End(at),
            (false, true) => Step::Trailer(at),
            (false, false) => Step::Framing(at),
        })
    }

    /// Scans up to the end of the body, or (`split`) to the start of a
    /// chunk's data or of the trailer section: how many bytes, and whether the
    /// body ended.
    fn advance(&mut self, bytes: &[u8], split: bool) -> Result<(usize, bool), ChunkError> {
        let mut at = 0;
        while at < bytes.len() {
            let byte = bytes[at];
            match self.state {
                State::Data if split => return Ok((at, false)),
                State::Size => match hex_value(byte) {
                    Some(digit) if self.digits < MAX_SIZE_DIGITS => {
                        self.digits += 1;
                        self.count = self.count << 4 | u64::from(digit);
                    }
                    None if self.digits > 0 => {
                        self.state = State::Extension;
                        continue;
                    }
                    _ => return Err(ChunkError),
                },
                State::Extension => match byte {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError),
                    _ => {}
                },
                State::SizeLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    if self.count > 0 {
                        self.state = State::Data;
                    } else {
                        self.state = State::TrailerStart;
                        if split {
                            return Ok((at + 1, false));
                        }
                    }
                }
                State::Data => {
                    let take =
                        (bytes.len() - at).min(usize::try_from(self.count).unwrap_or(usize::MAX));
                    self.count -= take as u64;
                    at += take;
                    if self.count == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if byte != b'\r' {
                        return Err(ChunkError);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = State::Size;
                    self.count = 0;
                    self.digits = 0;
                }
                State::TrailerStart => {
                    self.state = if byte == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => {
                    if byte == b'\n' {
                        self.state = State::TrailerStart;
                    }
                }
                State::EndLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = State::Done;
                    return Ok((at + 1, true));
                }
                State::Done => return Ok((at, true)),
            }
            at += 1;
        }
        Ok((at, self.state == State::Done))
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";

    #[test]
    fn finds_the_end_of_a_body_in_one_piece() {
        let mut wire = BODY.to_vec();
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(ChunkedScanner::default().scan(&wire), Ok(Some(BODY.len())));
    }

    #[test]
    fn finds_the_end_whatever_the_pieces() {
        for split in 1..BODY.len() {
            let mut scanner = ChunkedScanner::default();
            let (first, second) = BODY.split_at(split);
            assert_eq!(scanner.scan(first), Ok(None), "split at {split}");
            assert_eq!(
                scanner.scan(second),
                Ok(Some(second.len())),
                "split at {split}"
            );
        }
        let mut scanner = ChunkedScanner::default();
        for (i, byte) in BODY.iter().enumerate() {
            let end = (i == BODY.len() - 1).then_some(1);
            assert_eq!(
                scanner.scan(std::slice::from_ref(byte)),
                Ok(end),
                "byte {i}"
            );
        }
    }

    /// The data and the trailer section of `wire` as `step` splits them, fed
    /// in pieces of `piece` bytes, and where the body ended.
    fn split(wire: &[u8], piece: usize) -> Result<(String, String, usize), ChunkError> {
        let mut scanner = ChunkedScanner::default();
        let (mut data, mut trailer) = (Vec::new(), Vec::new());
        let (mut at, mut fed) = (0, piece.min(wire.len()));
        loop {
            let step = scanner.step(&wire[at..fed])?;
            let (Step::Data(n) | Step::Framing(n) | Step::Trailer(n) | Step::End(n)) = step;
            match step {
                Step::Data(_) => data.extend_from_slice(&wire[at..at + n]),
                Step::Framing(_) => {}
                Step::Trailer(_) | Step::End(_) => trailer.extend_from_slice(&wire[at..at + n]),
            }
            at += n;
            if let Step::End(_) = step {
                let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("ASCII");
                return Ok((text(data), text(trailer), at));
            }
            if at == fed {
                assert!(fed < wire.len(), "the body ended early");
                fed = (fed + piece).min(wire.len());
            }
        }
    }

    #[test]
    fn splits_data_framing_and_trailers_whatever_the_pieces() {
        let mut wire = BODY.to_vec();
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for piece in 1..=wire.len() {
            assert_eq!(
                split(&wire, piece),
                Ok((
                    "helloabcdefghijklmnopqrstuvwxyz".to_owned(),
                    "x-trailer: 1\r\n\r\n".to_owned(),
                    BODY.len()
                )),
                "pieces of {piece}"
            );
        }
        assert_eq!(
            split(b"0\r\n\r\n", 5),
            Ok((String::new(), "\r\n".to_owned(), 5))
        );
        assert_eq!(split(b"3\r\nabcX\r\n", 20), Err(ChunkError));
    }

    #[test]
    fn an_empty_body_is_one_zero_chunk() {
        assert_eq!(ChunkedScanner::default().scan(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(ChunkedScanner::default().scan(b"000\r\n\r\n"), Ok(Some(7)));
    }

    #[test]
    fn rejects_what_is_not_chunked() {
        for wire in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\nhello",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\rX",
            b"0\r\n\rX",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(
                ChunkedScanner::default().scan(wire),
                Err(ChunkError),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn a_size_of_sixteen_digits_is_read_whole() {
        let mut scanner = ChunkedScanner::default();
        assert_eq!(scanner.scan(b"ffffffffffffffff\r\nab"), Ok(None));
        assert_eq!(scanner.count, u64::MAX - 2);
    }
}
