//! The config stream from trellisd: protobuf `ConfigUpdate`s decoded, applied with
//! `trellis_api::stream::receive`, and the resulting slice built into ztunnel's state
//! (`ProxyState::from_slice`) after each update, as a ztunnel does. Each chunk is also decoded
//! as a lone `Resource` and built into a state of its own.
//!
//! Input: chunks one after another, each two little-endian length bytes and an encoded message
//! (`trellis_fuzz::encode_chunks`), so that removals and upserts meet earlier state.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use trellis_api::config::v1 as pb;
use trellis_api::slice::{key_of, Slice};
use trellis_api::stream::{receive, Applied};
use trellis_fuzz::{Input, NODE};
use trellis_ztunnel::state::ProxyState;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut applied = Applied::default();
    while !input.is_empty() {
        let chunk = input.chunk();
        if let Ok(resource) = pb::Resource::decode(chunk) {
            if let Some(key) = key_of(&resource) {
                let slice: Slice = [(key, Arc::new(resource))].into();
                let _ = ProxyState::from_slice(NODE, 0, &slice);
            }
        }
        let Ok(update) = pb::ConfigUpdate::decode(chunk) else {
            continue;
        };
        let ack = receive(&mut applied, update);
        if ack.error.is_empty() {
            let _ = ProxyState::from_slice(NODE, applied.version, &applied.slice);
        }
    }
});
