//! `x-mock-encoding`: compressed response bodies. A body sent in one go is compressed whole; a
//! stream is compressed incrementally with a sync flush after every event, so each event can be
//! decoded as soon as it arrives, and the stream's end (gzip trailer, final brotli block) rides
//! on the last event.

use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::Compression;
use std::io::Write;

/// Brotli quality: fast enough for multi-megabyte bodies, still a real brotli stream.
const BROTLI_QUALITY: u32 = 5;
/// Brotli window (log2) unless `x-mock-brotli-lgwin` says otherwise: 4 MiB.
pub const BROTLI_WINDOW: u32 = 22;
/// The windows `x-mock-brotli-lgwin` accepts: RFC 7932's 10 to 24 (16 MiB; larger needs the
/// non-standard "large window" brotli that HTTP does not use).
pub const BROTLI_WINDOWS: std::ops::RangeInclusive<u32> = 10..=24;

/// A `content-encoding` the mock can produce.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Encoding {
    Gzip,
    /// HTTP's `deflate`: a zlib stream (RFC 1950).
    Zlib,
    /// A raw deflate stream (RFC 1951) labelled `deflate`, as some servers send.
    RawDeflate,
    Brotli,
}

impl Encoding {
    const NAMES: &'static str = "identity, gzip, deflate, raw-deflate, br";

    /// Parses an `x-mock-encoding` value: `Ok(None)` for `identity`, `Err` lists the choices.
    pub fn parse(s: &str) -> Result<Option<Encoding>, &'static str> {
        Ok(Some(match s {
            "identity" => return Ok(None),
            "gzip" => Encoding::Gzip,
            "deflate" => Encoding::Zlib,
            "raw-deflate" => Encoding::RawDeflate,
            "br" => Encoding::Brotli,
            _ => return Err(Encoding::NAMES),
        }))
    }

    /// The `content-encoding` value.
    pub fn header(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zlib | Encoding::RawDeflate => "deflate",
            Encoding::Brotli => "br",
        }
    }
}

/// A compressor writing into a `Vec` that is drained after every flush.
enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    Zlib(ZlibEncoder<Vec<u8>>),
    RawDeflate(DeflateEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    /// `lgwin`: the brotli window (log2, within [`BROTLI_WINDOWS`]); ignored by the others.
    fn new(encoding: Encoding, lgwin: u32) -> Encoder {
        match encoding {
            Encoding::Gzip => Encoder::Gzip(GzEncoder::new(Vec::new(), Compression::default())),
            Encoding::Zlib => Encoder::Zlib(ZlibEncoder::new(Vec::new(), Compression::default())),
            Encoding::RawDeflate => Encoder::RawDeflate(DeflateEncoder::new(Vec::new(), Compression::default())),
            Encoding::Brotli => {
                Encoder::Brotli(Box::new(brotli::CompressorWriter::new(Vec::new(), 4096, BROTLI_QUALITY, lgwin)))
            }
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Encoder::Gzip(e) => e,
            Encoder::Zlib(e) => e,
            Encoder::RawDeflate(e) => e,
            Encoder::Brotli(e) => e.as_mut(),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Zlib(e) => e.get_mut(),
            Encoder::RawDeflate(e) => e.get_mut(),
            Encoder::Brotli(e) => e.get_mut(),
        }
    }

    /// Compresses `data` and flushes: the bytes returned decode to everything written so far.
    fn flushed(&mut self, data: &[u8]) -> Vec<u8> {
        let w = self.writer();
        // Writing into a Vec cannot fail.
        w.write_all(data).and_then(|_| w.flush()).expect("compress into memory");
        std::mem::take(self.output())
    }

    /// Ends the stream: the bytes not yet returned.
    fn finish(self) -> Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.finish().expect("compress into memory"),
            Encoder::Zlib(e) => e.finish().expect("compress into memory"),
            Encoder::RawDeflate(e) => e.finish().expect("compress into memory"),
            Encoder::Brotli(e) => e.into_inner(),
        }
    }
}

/// Compresses a whole body; `lgwin` is the brotli window (log2).
pub fn compress(encoding: Encoding, body: &[u8], lgwin: u32) -> Vec<u8> {
    let mut e = Encoder::new(encoding, lgwin);
    e.writer().write_all(body).expect("compress into memory");
    e.finish()
}

/// Compresses a stream piece by piece: piece `i` of the result decodes (after the pieces before
/// it) to exactly piece `i` of the input. The end of the compressed stream is added to the last
/// piece, so the number of pieces does not change. `lgwin` is the brotli window (log2).
pub fn compress_stream(encoding: Encoding, pieces: &[Vec<u8>], lgwin: u32) -> Vec<Vec<u8>> {
    let mut e = Encoder::new(encoding, lgwin);
    let mut out: Vec<Vec<u8>> = pieces.iter().map(|p| e.flushed(p)).collect();
    let end = e.finish();
    match out.last_mut() {
        Some(last) => last.extend_from_slice(&end),
        None => out.push(end),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const ALL: [Encoding; 4] = [Encoding::Gzip, Encoding::Zlib, Encoding::RawDeflate, Encoding::Brotli];

    fn decompress(encoding: Encoding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match encoding {
            Encoding::Gzip => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
            Encoding::Zlib => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out),
            Encoding::RawDeflate => flate2::read::DeflateDecoder::new(data).read_to_end(&mut out),
            Encoding::Brotli => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
        }
        .unwrap();
        out
    }

    /// Decodes a prefix of a stream that has not ended: everything decodable so far.
    fn decode_prefix(encoding: Encoding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let mut read = |r: &mut dyn Read| loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        };
        match encoding {
            Encoding::Gzip => read(&mut flate2::read::GzDecoder::new(data)),
            Encoding::Zlib => read(&mut flate2::read::ZlibDecoder::new(data)),
            Encoding::RawDeflate => read(&mut flate2::read::DeflateDecoder::new(data)),
            Encoding::Brotli => read(&mut brotli::Decompressor::new(data, 4096)),
        }
        out
    }

    #[test]
    fn parse_and_header() {
        assert_eq!(Encoding::parse("identity"), Ok(None));
        assert_eq!(Encoding::parse("deflate").unwrap().unwrap().header(), "deflate");
        assert_eq!(Encoding::parse("raw-deflate").unwrap().unwrap().header(), "deflate");
        assert_eq!(Encoding::parse("br").unwrap().unwrap().header(), "br");
        assert!(Encoding::parse("zstd").is_err());
    }

    #[test]
    fn whole_bodies_round_trip() {
        let body = br#"{"usage":{"prompt_tokens":12}}"#.repeat(50);
        for e in ALL {
            let c = compress(e, &body, BROTLI_WINDOW);
            assert!(c.len() < body.len(), "{e:?}");
            assert_eq!(decompress(e, &c), body, "{e:?}");
        }
        assert_eq!(&compress(Encoding::Gzip, &body, BROTLI_WINDOW)[..2], [0x1f, 0x8b], "gzip magic");
        assert_eq!(compress(Encoding::Zlib, &body, BROTLI_WINDOW)[0] & 0x0f, 8, "zlib header: deflate method");
    }

    /// The window a brotli stream declares (its WBITS, RFC 7932 section 9.1).
    fn brotli_window(data: &[u8]) -> u32 {
        let b = u32::from(data[0]);
        if b & 1 == 0 {
            return 16;
        }
        match ((b >> 1) & 7, (b >> 4) & 7) {
            (0, 0) => 17,
            (0, m) => 8 + m,
            (n, _) => 17 + n,
        }
    }

    #[test]
    fn brotli_window_is_the_one_asked_for() {
        let body = br#"{"choices":[{"message":{"content":"abc"}}]}"#.repeat(2000);
        for lgwin in [10, 16, 18, 22, 24] {
            let c = compress(Encoding::Brotli, &body, lgwin);
            assert_eq!(brotli_window(&c), lgwin);
            assert_eq!(decompress(Encoding::Brotli, &c), body, "lgwin {lgwin}");
            let pieces = compress_stream(Encoding::Brotli, &[body.clone(), body.clone()], lgwin);
            assert_eq!(brotli_window(&pieces[0]), lgwin);
            assert_eq!(decompress(Encoding::Brotli, &pieces.concat()), body.repeat(2));
        }
        assert_eq!(brotli_window(&compress(Encoding::Brotli, &body, BROTLI_WINDOW)), 22, "the default");
    }

    #[test]
    fn every_stream_piece_decodes_on_arrival() {
        let events: Vec<Vec<u8>> =
            (0..5).map(|i| format!("data: {{\"n\":{i},\"text\":\"hello hello\"}}\n\n").into_bytes()).collect();
        for e in ALL {
            let pieces = compress_stream(e, &events, BROTLI_WINDOW);
            assert_eq!(pieces.len(), events.len());
            for n in 1..=pieces.len() {
                let got = decode_prefix(e, &pieces[..n].concat());
                assert_eq!(got, events[..n].concat(), "{e:?}: first {n} pieces");
            }
            assert_eq!(decompress(e, &pieces.concat()), events.concat(), "{e:?}");
        }
    }
}
