//! Helpers shared by the fuzz targets (`fuzz_targets/`) and the seed builder
//! (`examples/seeds.rs`): the fixed identities and key the targets assume, and the few byte
//! layouts that turn fuzz input into structured requests.
//!
//! Every target's property is the same: no input makes the parser panic.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};

/// The trust domain of the CA the `csr` target signs with.
pub const TRUST_DOMAIN: &str = "east.trellis.local";
/// The identity a fuzzed CSR is requested for when the input names none.
pub const CSR_ID: &str = "spiffe://east.trellis.local/ns/shop/sa/web";
/// The node whose state the `hbone_connect` and `config_update` targets build.
pub const NODE: &str = "node-1";

/// The fixed Ed25519 key that signs fuzzed CSR bodies (deterministic, so a crash replays).
pub fn csr_key() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("a 32-byte seed is a valid Ed25519 key")
}

/// The key's PKCS#8 document, for the seed builder.
pub fn csr_key_pkcs8() -> Vec<u8> {
    csr_key().to_pkcs8().expect("Ed25519 keys serialize").as_ref().to_vec()
}

/// The key's raw public key.
pub fn csr_public_key() -> Vec<u8> {
    csr_key().public_key().as_ref().to_vec()
}

/// A DER header (tag and definite length) for `len` content bytes.
fn der_header(tag: u8, len: usize, out: &mut Vec<u8>) {
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Wraps `info` (the fuzzed CertificationRequestInfo, any bytes) into a PKCS#10 request signed
/// with [`csr_key`]: the signature verifies whenever `info` carries that key's SPKI.
pub fn signed_csr(info: &[u8]) -> Vec<u8> {
    let signature = csr_key().sign(info);
    // AlgorithmIdentifier { id-Ed25519 } and BIT STRING { 0 unused bits, signature }.
    let mut tail = vec![0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    der_header(0x03, signature.as_ref().len() + 1, &mut tail);
    tail.push(0);
    tail.extend_from_slice(signature.as_ref());
    let mut out = Vec::with_capacity(info.len() + tail.len() + 8);
    der_header(0x30, info.len() + tail.len(), &mut out);
    out.extend_from_slice(info);
    out.extend_from_slice(&tail);
    out
}

/// The first TLV inside the outer SEQUENCE of `der` (a CSR's CertificationRequestInfo), for
/// the seed builder. `None` if `der` is not a definite-length SEQUENCE.
pub fn first_inner_tlv(der: &[u8]) -> Option<&[u8]> {
    fn header(der: &[u8]) -> Option<(usize, usize)> {
        let first = *der.get(1)?;
        if first < 0x80 {
            return Some((2, first as usize));
        }
        let n = (first & 0x7f) as usize;
        let len = der
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        Some((2 + n, len))
    }
    let (outer_head, _) = header(der)?;
    let inner = der.get(outer_head..)?;
    let (head, len) = header(inner)?;
    inner.get(..head + len)
}

/// Reads fixed fields off the front of a fuzz input; running out yields zeros and empty slices.
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn u8(&mut self) -> u8 {
        let (first, rest) = self.rest.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.rest = rest;
        first
    }

    pub fn u64(&mut self) -> u64 {
        let n = self.rest.len().min(8);
        let mut bytes = [0u8; 8];
        bytes[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        u64::from_le_bytes(bytes)
    }

    /// A slice of the length given by the next byte.
    pub fn short(&mut self) -> &'a [u8] {
        let n = (self.u8() as usize).min(self.rest.len());
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        head
    }

    /// A slice of the length given by the next two bytes (little-endian).
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = (u16::from_le_bytes([self.u8(), self.u8()]) as usize).min(self.rest.len());
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        head
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Layout of the `csr` target's input, shared with the seed builder.
pub mod csr_input {
    /// Bit 0 of the first byte: the rest is a CertificationRequestInfo to be signed with
    /// [`super::csr_key`], not a whole request.
    pub const SIGN_BODY: u8 = 1;

    /// Encodes a seed: flags, requested TTL in seconds, the requested SPIFFE ID (empty: the
    /// default [`super::CSR_ID`]), then the request bytes.
    pub fn encode(flags: u8, ttl_seconds: u64, spiffe_id: &str, request: &[u8]) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(&ttl_seconds.to_le_bytes());
        out.push(spiffe_id.len() as u8);
        out.extend_from_slice(spiffe_id.as_bytes());
        out.extend_from_slice(request);
        out
    }
}

/// Layout of the `config_update` and `peer_cert` inputs: chunks one after another (a protobuf
/// message, a DER certificate), each as two little-endian length bytes and the bytes.
pub fn encode_chunks(chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for u in chunks {
        out.extend_from_slice(&(u.len() as u16).to_le_bytes());
        out.extend_from_slice(u);
    }
    out
}
