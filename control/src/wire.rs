//! The config stream's server-side wire: updates are written from pre-encoded resources, so a
//! snapshot for a hundred nodes costs a hundred memory copies, not a hundred encodings. The
//! bytes are exactly a `trellis.config.v1.ConfigUpdate`; subscribers decode them with prost as
//! usual.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Status, Streaming};
use trellis_api::config::v1 as pb;

use trellis_mesh::model::{Entry, ResKey};

/// One update, as the server sends it.
#[derive(Debug, Clone)]
pub struct RawUpdate {
    pub version: u64,
    pub snapshot: bool,
    pub upserts: Vec<Arc<Entry>>,
    pub removals: Vec<ResKey>,
}

impl RawUpdate {
    /// Writes the `ConfigUpdate` encoding (fields 1-4) into `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        if self.version != 0 {
            encode_key(1, WireType::Varint, dst);
            encode_varint(self.version, dst);
        }
        if self.snapshot {
            encode_key(2, WireType::Varint, dst);
            encode_varint(1, dst);
        }
        for entry in &self.upserts {
            encode_key(3, WireType::LengthDelimited, dst);
            encode_varint(entry.encoded.len() as u64, dst);
            dst.put_slice(&entry.encoded);
        }
        for key in &self.removals {
            let key = key.to_proto();
            encode_key(4, WireType::LengthDelimited, dst);
            encode_varint(key.encoded_len() as u64, dst);
            key.encode_raw(dst);
        }
    }
}

/// Writes [`RawUpdate`]s, reads `StreamRequest`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RequestDecoder;

impl Encoder for RawEncoder {
    type Item = RawUpdate;
    type Error = Status;
    fn encode(&mut self, item: RawUpdate, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

impl Decoder for RequestDecoder {
    type Item = pb::StreamRequest;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::StreamRequest>, Status> {
        pb::StreamRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed StreamRequest: {e}")))
    }
}

impl Codec for RawCodec {
    type Encode = RawUpdate;
    type Decode = pb::StreamRequest;
    type Encoder = RawEncoder;
    type Decoder = RequestDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

/// What answers a subscription.
pub type UpdateStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RawUpdate, Status>> + Send>>;

/// The handler behind the service.
#[tonic::async_trait]
pub trait StreamHandler: Send + Sync + 'static {
    async fn stream(
        &self,
        request: tonic::Request<Streaming<pb::StreamRequest>>,
    ) -> Result<tonic::Response<UpdateStream>, Status>;
}

/// `trellis.config.v1.ConfigService` for tonic's router, using [`RawCodec`].
pub struct ConfigServiceServer<T> {
    inner: Arc<T>,
}

impl<T> ConfigServiceServer<T> {
    pub fn new(inner: T) -> Self {
        Self { inner: Arc::new(inner) }
    }
}

impl<T> Clone for ConfigServiceServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> NamedService for ConfigServiceServer<T> {
    const NAME: &'static str = "trellis.config.v1.ConfigService";
}

struct Method<T>(Arc<T>);

impl<T: StreamHandler> StreamingService<pb::StreamRequest> for Method<T> {
    type Response = RawUpdate;
    type ResponseStream = UpdateStream;
    type Future = futures::future::BoxFuture<'static, Result<tonic::Response<UpdateStream>, Status>>;
    fn call(&mut self, request: tonic::Request<Streaming<pb::StreamRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream(request).await })
    }
}

impl<T, B> tower::Service<http::Request<B>> for ConfigServiceServer<T>
where
    T: StreamHandler,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        if req.uri().path() != "/trellis.config.v1.ConfigService/Stream" {
            return Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) });
        }
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec);
            Ok(grpc.streaming(Method(inner), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_update_decodes_as_a_config_update() {
        let resource = pb::Resource {
            kind: Some(pb::resource::Kind::Waypoint(pb::Waypoint {
                name: "wp".into(),
                namespace: "shop".into(),
                addresses: vec![trellis_api::addr::to_bytes("10.1.1.1".parse().unwrap())],
                hbone_port: 15008,
                identity: "spiffe://td/ns/shop/sa/wp".into(),
            })),
        };
        let entry = Arc::new(Entry {
            key: ResKey::new(pb::Kind::Waypoint, "shop/wp"),
            encoded: resource.encode_to_vec(),
            resource: resource.clone(),
        });
        let raw = RawUpdate {
            version: 42,
            snapshot: true,
            upserts: vec![entry.clone(), entry],
            removals: vec![ResKey::new(pb::Kind::Service, "shop/cart")],
        };
        let mut buf = Vec::new();
        raw.encode(&mut buf);
        let decoded = pb::ConfigUpdate::decode(buf.as_slice()).unwrap();
        assert_eq!(
            decoded,
            pb::ConfigUpdate {
                version: 42,
                snapshot: true,
                upserts: vec![resource.clone(), resource],
                removals: vec![pb::ResourceKey {
                    kind: pb::Kind::Service as i32,
                    name: "shop/cart".into()
                }],
            }
        );
    }
}
