//! The few pieces of HTTP/3 (RFC 9114) and QPACK (RFC 9204) that a tunnel *client* speaks,
//! written here rather than taken from the h3 crate's client, which in 0.0.8 adds `:scheme` and
//! `:path` to a plain `CONNECT` (RFC 9114 §4.4 says a CONNECT carries only `:method` and
//! `:authority`; a strict server answers such a request as malformed). The server side (15009)
//! is the h3 crate's, which accepts a correct CONNECT.
//!
//! What is here, all pure: QUIC variable-length integers (RFC 9000 §16), frame headers, the
//! SETTINGS frame of the control stream, a QPACK field section for the CONNECT that uses the
//! static table and literals only (no dynamic table: Trellis advertises a table capacity of 0,
//! so the peer may not refer to one either), and a decoder that reads the `:status` of the
//! answer out of any field section that respects that.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame types (RFC 9114 §7.2).
pub const DATA: u64 = 0x0;
pub const HEADERS: u64 = 0x1;
pub const SETTINGS: u64 = 0x4;
/// GOAWAY (RFC 9114 §7.2.6): the server takes no requests beyond the stream it names.
pub const GOAWAY: u64 = 0x7;
/// The control stream's type (RFC 9114 §6.2.1).
pub const CONTROL_STREAM: u64 = 0x0;
/// SETTINGS_MAX_FIELD_SECTION_SIZE (RFC 9114 §7.2.4.1).
pub const MAX_FIELD_SECTION_SIZE: u64 = 0x6;
/// H3_REQUEST_REJECTED: the server did not process the request (RFC 9114 §8.1).
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
/// H3_REQUEST_CANCELLED.
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// H3_NO_ERROR.
pub const H3_NO_ERROR: u64 = 0x100;

/// Appends `v` as a QUIC variable-length integer; `None` if it is past 2^62.
pub fn put_varint(buf: &mut BytesMut, v: u64) -> Option<()> {
    match v {
        0..=0x3f => buf.put_u8(v as u8),
        0x40..=0x3fff => buf.put_u16(0x4000 | v as u16),
        0x4000..=0x3fff_ffff => buf.put_u32(0x8000_0000 | v as u32),
        0x4000_0000..=0x3fff_ffff_ffff_ffff => buf.put_u64(0xc000_0000_0000_0000 | v),
        _ => return None,
    }
    Some(())
}

/// How many bytes the varint whose first byte is `first` takes.
pub fn varint_len(first: u8) -> usize {
    1 << (first >> 6)
}

/// Reads one varint off the front of `buf`: its value and length, `None` if `buf` is too short.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let len = varint_len(*buf.first()?);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(bytes[0] & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// A frame header: type, then payload length.
pub fn frame_header(kind: u64, len: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(16);
    // Both fit: our types are small and a length is a usize.
    let _ = put_varint(&mut buf, kind);
    let _ = put_varint(&mut buf, len as u64);
    buf.freeze()
}

/// The start of the client's control stream: its type, then a SETTINGS frame that bounds the
/// answers' field sections. No QPACK dynamic table (capacity 0 is the default, left unsent).
pub fn control_stream(max_field_section: u64) -> Bytes {
    let mut settings = BytesMut::new();
    let _ = put_varint(&mut settings, MAX_FIELD_SECTION_SIZE);
    let _ = put_varint(&mut settings, max_field_section);
    let mut buf = BytesMut::new();
    let _ = put_varint(&mut buf, CONTROL_STREAM);
    buf.extend_from_slice(&frame_header(SETTINGS, settings.len()));
    buf.extend_from_slice(&settings);
    buf.freeze()
}

/// Appends an integer with an `n`-bit prefix (RFC 7541 §5.1, as QPACK uses it); `flags` holds
/// the bits above the prefix.
fn put_prefixed(buf: &mut BytesMut, flags: u8, n: u8, mut v: u64) {
    let max = (1u64 << n) - 1;
    if v < max {
        buf.put_u8(flags | v as u8);
        return;
    }
    buf.put_u8(flags | max as u8);
    v -= max;
    while v >= 128 {
        buf.put_u8((v % 128) as u8 | 0x80);
        v /= 128;
    }
    buf.put_u8(v as u8);
}

/// Reads an integer with an `n`-bit prefix at `buf[*at]`, moving `at` past it.
fn get_prefixed(buf: &[u8], at: &mut usize, n: u8) -> Result<u64, String> {
    let max = (1u64 << n) - 1;
    let first = *buf.get(*at).ok_or("field section cut short")?;
    *at += 1;
    let mut v = u64::from(first) & max;
    if v < max {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*at).ok_or("field section cut short")?;
        *at += 1;
        if shift > 56 {
            return Err("integer too large in field section".into());
        }
        v += u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// Appends a string literal without Huffman coding, its length with an `n`-bit prefix.
fn put_string(buf: &mut BytesMut, flags: u8, n: u8, s: &[u8]) {
    put_prefixed(buf, flags, n, s.len() as u64);
    buf.extend_from_slice(s);
}

/// Reads a string literal whose H bit sits just above its `n`-bit length prefix; returns it
/// decoded only if `want` (Huffman included), otherwise skips it.
fn get_string(buf: &[u8], at: &mut usize, n: u8, want: bool) -> Result<Option<Vec<u8>>, String> {
    let huffman = buf.get(*at).ok_or("field section cut short")? & (1 << n) != 0;
    let len = get_prefixed(buf, at, n)? as usize;
    let end = at
        .checked_add(len)
        .filter(|end| *end <= buf.len())
        .ok_or("field section cut short")?;
    let raw = &buf[*at..end];
    *at = end;
    if !want {
        return Ok(None);
    }
    if huffman {
        digits_huffman(raw).map(Some)
    } else {
        Ok(Some(raw.to_vec()))
    }
}

/// The Huffman codes (RFC 7541 Appendix B) of the ten digits, the only characters a status has.
const DIGIT_CODES: [(u32, u32); 10] = [
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
];

/// Decodes a Huffman-coded string of digits; anything else is an error (a status is digits).
fn digits_huffman(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in raw {
        acc = (acc << 8) | u32::from(*byte);
        bits += 8;
        'next: while bits >= 5 {
            for (digit, (code, len)) in DIGIT_CODES.iter().enumerate() {
                if bits >= *len && (acc >> (bits - len)) & ((1 << len) - 1) == *code {
                    out.push(b'0' + digit as u8);
                    bits -= len;
                    acc &= (1 << bits) - 1;
                    continue 'next;
                }
            }
            break;
        }
        if bits > 16 {
            return Err("Huffman-coded status holds more than digits".into());
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones (the EOS prefix).
    if bits >= 8 || acc != (1 << bits) - 1 {
        return Err("Huffman-coded status holds more than digits".into());
    }
    Ok(out)
}

/// The QPACK field section of a tunnel `CONNECT`: `:method CONNECT` and `:authority` from the
/// static table, then `headers` as literals (names lowercase, as HTTP/3 requires).
pub fn connect_fields(authority: &str, headers: &[(String, Vec<u8>)]) -> Bytes {
    let mut buf = BytesMut::with_capacity(64 + authority.len());
    // Required Insert Count 0, Delta Base 0: no dynamic table.
    buf.put_u8(0);
    buf.put_u8(0);
    // Indexed field line, static (T=1): 15 is `:method CONNECT`.
    put_prefixed(&mut buf, 0b1100_0000, 6, 15);
    // Literal with a static name reference (T=1, N=0): 0 is `:authority`.
    put_prefixed(&mut buf, 0b0101_0000, 4, 0);
    put_string(&mut buf, 0, 7, authority.as_bytes());
    for (name, value) in headers {
        // Literal with a literal name (N=0, H=0).
        put_string(&mut buf, 0b0010_0000, 3, name.to_ascii_lowercase().as_bytes());
        put_string(&mut buf, 0, 7, value);
    }
    buf.freeze()
}

/// The value of a static table entry whose name is `:status` (RFC 9204 Appendix A).
fn static_status(index: u64) -> Option<&'static [u8]> {
    Some(match index {
        24 => b"103",
        25 => b"200",
        26 => b"304",
        27 => b"404",
        28 => b"503",
        63 => b"100",
        64 => b"204",
        65 => b"206",
        66 => b"302",
        67 => b"400",
        68 => b"403",
        69 => b"421",
        70 => b"425",
        71 => b"500",
        _ => return None,
    })
}

/// The `:status` of an answer's field section. Refers to no dynamic table (we allowed none),
/// and names `:status` exactly once, before any other field.
pub fn response_status(section: &[u8]) -> Result<u16, String> {
    let mut at = 0;
    let required = get_prefixed(section, &mut at, 8)?;
    let _base = get_prefixed(section, &mut at, 7)?;
    if required != 0 {
        return Err("the answer refers to a QPACK dynamic table, which we did not allow".into());
    }
    let mut status: Option<Vec<u8>> = None;
    let mut first = true;
    while at < section.len() {
        let b = section[at];
        let value: Option<Vec<u8>> = if b & 0x80 != 0 {
            // Indexed field line.
            if b & 0x40 == 0 {
                return Err("the answer refers to a QPACK dynamic table".into());
            }
            let index = get_prefixed(section, &mut at, 6)?;
            static_status(index).map(<[u8]>::to_vec)
        } else if b & 0x40 != 0 {
            // Literal with a name reference.
            if b & 0x10 == 0 {
                return Err("the answer refers to a QPACK dynamic table".into());
            }
            let index = get_prefixed(section, &mut at, 4)?;
            let is_status = static_status(index).is_some();
            get_string(section, &mut at, 7, is_status)?
        } else if b & 0x20 != 0 {
            // Literal with a literal name: the name's H bit is just above its 3-bit prefix.
            let name = get_string(section, &mut at, 3, true)?;
            let is_status = name.as_deref() == Some(b":status".as_slice());
            if name.as_ref().is_none_or(|n| n.starts_with(b":")) && !is_status {
                return Err("the answer has a pseudo-header other than :status".into());
            }
            get_string(section, &mut at, 7, is_status)?
        } else {
            return Err("the answer refers to a QPACK dynamic table".into());
        };
        if let Some(value) = value {
            if !first || status.is_some() {
                return Err(":status is not the answer's first and only pseudo-header".into());
            }
            status = Some(value);
        }
        first = false;
    }
    let status = status.ok_or("the answer has no :status")?;
    std::str::from_utf8(&status)
        .ok()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!(":status {:?} is not a status code", String::from_utf8_lossy(&status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length() {
        for v in [
            0,
            37,
            63,
            64,
            15293,
            16383,
            16384,
            494_878_333,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v).unwrap();
            assert_eq!(get_varint(&buf), Some((v, buf.len())), "{v}");
        }
        assert!(put_varint(&mut BytesMut::new(), 1 << 62).is_none());
        // RFC 9000 §A.1's examples.
        assert_eq!(
            get_varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(get_varint(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
        assert_eq!(get_varint(&[0x7b, 0xbd]), Some((15293, 2)));
        assert_eq!(get_varint(&[0x25]), Some((37, 1)));
        assert_eq!(get_varint(&[0x7b]), None, "cut short");
    }

    #[test]
    fn the_connect_carries_only_method_and_authority_as_pseudo_headers() {
        let section = connect_fields("10.1.1.5:8080", &[("Baggage".into(), b"k=v".to_vec())]);
        let want: &[u8] = &[
            0x00, 0x00, // no dynamic table
            0xcf, // :method CONNECT (static 15)
            0x50, 13, // :authority (static 0), 13-byte literal value
        ];
        assert_eq!(&section[..5], want);
        assert_eq!(&section[5..18], b"10.1.1.5:8080");
        // Literal name "baggage" (7 bytes fill the 3-bit prefix: 0x27, then 0), value "k=v".
        assert_eq!(&section[18..], b"\x27\x00baggage\x03k=v");
    }

    #[test]
    fn long_names_and_values_take_continuation_bytes() {
        let long = "x".repeat(300);
        let section = connect_fields(&long, &[]);
        // 7-bit prefix full (127), then 300 - 127 = 173 = 0xad | 0x80, 0x01.
        assert_eq!(&section[4..7], &[0x7f, 0xad, 0x01]);
        assert_eq!(section.len(), 7 + 300);
    }

    #[test]
    fn the_status_is_read_from_the_static_table_from_literals_and_from_huffman_digits() {
        assert_eq!(response_status(&[0, 0, 0xd9]), Ok(200), "indexed: static 25");
        assert_eq!(response_status(&[0, 0, 0xdc]), Ok(503), "indexed: static 28");
        assert_eq!(
            response_status(&[0, 0, 0xc0 | 0x3f, 67 - 63]),
            Ok(400),
            "indexed: static 67"
        );
        // Literal with name ref to static 24 (`:status 103`), plain value "401".
        assert_eq!(response_status(&[0, 0, 0x5f, 24 - 15, 3, b'4', b'0', b'1']), Ok(401));
        // The same, Huffman: '4' 011010, '0' 00000, '1' 00001: 0110_1000 0000_0001.
        assert_eq!(response_status(&[0, 0, 0x5f, 24 - 15, 0x80 | 2, 0x68, 0x01]), Ok(401));
        // '2' 00010, '0' 00000, '0' 00000, then 1 bit of padding: 0001_0000 0000_0001.
        assert_eq!(response_status(&[0, 0, 0x5f, 9, 0x80 | 2, 0x10, 0x01]), Ok(200));
        // Literal name ":status" (7 bytes: the 3-bit prefix is full, then 0).
        let mut literal = vec![0, 0, 0x27, 0x00];
        literal.extend_from_slice(b":status");
        literal.extend_from_slice(&[3, b'2', b'0', b'0']);
        assert_eq!(response_status(&literal), Ok(200));
        // Other fields after it are skipped.
        let mut more = vec![0, 0, 0xd9, 0x20 | 6];
        more.extend_from_slice(b"server\x04test");
        assert_eq!(response_status(&more), Ok(200));
    }

    #[test]
    fn answers_that_break_the_rules_are_errors_not_panics() {
        assert!(response_status(&[]).is_err(), "empty");
        assert!(response_status(&[0, 0]).is_err(), "no :status");
        assert!(response_status(&[1, 0, 0xd9]).is_err(), "a dynamic table insert count");
        assert!(response_status(&[0, 0, 0x80]).is_err(), "a dynamic indexed line");
        assert!(response_status(&[0, 0, 0x10]).is_err(), "a post-base reference");
        assert!(response_status(&[0, 0, 0xd9, 0xd9]).is_err(), "two statuses");
        assert!(response_status(&[0, 0, 0x5f, 9, 3, b'2', b'0']).is_err(), "cut short");
        assert!(response_status(&[0, 0, 0x5f, 9, 2, b'2', b'0']).is_err(), "two digits");
        assert!(
            response_status(&[0, 0, 0x5f, 9, 3, b'9', b'9', b'9']).is_err(),
            "out of range"
        );
        assert!(
            response_status(&[0, 0, 0x5f, 9, 0x83, 0xff, 0xff, 0xff]).is_err(),
            "Huffman non-digits"
        );
        assert!(response_status(&[0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut path = vec![0, 0, 0x20 | 5];
        path.extend_from_slice(b":path\x01/");
        path.push(0xd9);
        assert!(response_status(&path).is_err(), "a request pseudo-header in an answer");
    }

    #[test]
    fn the_control_stream_opens_with_its_type_and_settings() {
        let control = control_stream(16 * 1024);
        // Type 0, SETTINGS (4) of 4 bytes: id 6, value 16384 (0x80 0x00 0x40 0x00).
        assert_eq!(&control[..], &[0x00, 0x04, 0x05, 0x06, 0x80, 0x00, 0x40, 0x00]);
    }
}
