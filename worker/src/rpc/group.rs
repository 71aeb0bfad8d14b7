//! The tensor placement's streams: a member's end (the `TensorGroup`
//! service, [`follow`]) and rank 0's ([`lead`]). Both only move messages
//! between the stream and the batching thread's channels (see
//! `node::group`); the values are f32 as computed, so the group's sums are
//! exact on the wire.
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Status, Streaming};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::group_down::Body as DownBody;
use zeroshard_proto::v1::group_up::Body as UpBody;
use zeroshard_proto::v1::tensor_group_client::TensorGroupClient;
use zeroshard_security::Security;

use crate::error::{Result, WorkerError};
use crate::node::group::{Down, Joined, Leader, Member, MemberLink, Order, Up};
use crate::node::{Command, Node};

/// Largest group message: a step's activations (`[rows, hidden]` f32; a
/// prefill of many long prompts is large) or its logits.
pub(crate) const GROUP_MESSAGE_BYTES: usize = 1 << 30;

/// How long a member waits for its own activation of the epoch rank 0 names.
const ACTIVATION_PATIENCE: Duration = Duration::from_secs(30);

pub(crate) type UpStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::GroupUp, Status>> + Send>>;

fn f32s(a: Option<pb::Activations>) -> std::result::Result<Vec<f32>, String> {
    let b = a.map(|a| a.f32le).unwrap_or_default();
    if b.len() % 4 != 0 {
        return Err(format!("activations of {} bytes, not whole f32 values", b.len()));
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn activations(v: &[f32]) -> pb::Activations {
    let mut b = Vec::with_capacity(v.len() * 4);
    v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
    pb::Activations { f32le: b.into() }
}

fn down_message(d: Down) -> pb::GroupDown {
    let body = match d {
        Down::Order(o) => DownBody::Order(pb::GroupOrder {
            joined: o
                .joined
                .into_iter()
                .map(|j| pb::GroupSequence {
                    id: j.id,
                    prompt_token_ids: j.prompt,
                    max_new_tokens: j.max_new_tokens as u32,
                    ignore_eos: j.ignore_eos,
                })
                .collect(),
            left: o.left,
            step: o.step,
        }),
        Down::Sum(v) => DownBody::Sum(activations(&v)),
        Down::Tokens(t) => DownBody::Tokens(pb::TokenIds { ids: t }),
    };
    pb::GroupDown { body: Some(body) }
}

fn down(m: pb::GroupDown) -> std::result::Result<Down, String> {
    Ok(match m.body {
        Some(DownBody::Order(o)) => Down::Order(Order {
            joined: o
                .joined
                .into_iter()
                .map(|j| Joined {
                    id: j.id,
                    prompt: j.prompt_token_ids,
                    max_new_tokens: j.max_new_tokens as usize,
                    ignore_eos: j.ignore_eos,
                })
                .collect(),
            left: o.left,
            step: o.step,
        }),
        Some(DownBody::Sum(a)) => Down::Sum(f32s(Some(a))?),
        Some(DownBody::Tokens(t)) => Down::Tokens(t.ids),
        Some(DownBody::Hello(_)) => return Err("a second hello".into()),
        None => return Err("an empty message".into()),
    })
}

fn up_message(u: Up) -> pb::GroupUp {
    let body = match u {
        Up::Partial(v) => UpBody::Partial(activations(&v)),
        Up::Logits(v) => UpBody::Logits(activations(&v)),
    };
    pb::GroupUp { body: Some(body) }
}

fn up(m: pb::GroupUp) -> std::result::Result<Up, String> {
    match m.body {
        Some(UpBody::Partial(a)) => Ok(Up::Partial(f32s(Some(a))?)),
        Some(UpBody::Logits(a)) => Ok(Up::Logits(f32s(Some(a))?)),
        None => Err("an empty message".into()),
    }
}

/// A member's end of `Follow`: checks the hello against the epoch this worker
/// activated, then hands the stream to the batching loop.
pub(crate) async fn follow(node: &Arc<Node>, req: Request<Streaming<pb::GroupDown>>) -> Result<UpStream> {
    let mut inbound = req.into_inner();
    let hello = match inbound.message().await {
        Ok(Some(pb::GroupDown { body: Some(DownBody::Hello(h)) })) => h,
        Ok(_) => return Err(WorkerError::InvalidRequest("a Follow stream starts with its hello".into())),
        Err(s) => {
            return Err(WorkerError::InvalidRequest(format!("the Follow stream broke: {}", s.message())))
        }
    };
    let (rank, degree) = (hello.rank as usize, hello.degree as usize);
    node.await_group(hello.epoch, rank, degree, ACTIVATION_PATIENCE).await?;
    let (down_tx, down_rx) = std::sync::mpsc::channel();
    let (up_tx, up_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Ends (closing the member's channel) when rank 0 closes or breaks the stream.
        while let Ok(Some(m)) = inbound.message().await {
            match down(m) {
                Ok(d) => {
                    if down_tx.send(d).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!("tensor-parallel group: rank 0 sent {e}");
                    break;
                }
            }
        }
    });
    node.send(Command::Follow(Member {
        rank,
        degree,
        epoch: hello.epoch,
        down: Mutex::new(down_rx),
        up: up_tx,
    }));
    Ok(Box::pin(UnboundedReceiverStream::new(up_rx).map(|u| Ok(up_message(u)))))
}

/// Rank 0's end: opens `Follow` to each other member (`(rank, address)`, in
/// rank order) under `epoch`; returns once every member has accepted.
pub(crate) async fn lead(
    security: &Security,
    epoch: u64,
    degree: usize,
    members: Vec<(usize, String)>,
) -> Result<Leader> {
    let mut links = Vec::with_capacity(members.len());
    for (rank, address) in members {
        let channel = super::peer::connect(security, &address).await?;
        let mut client = TensorGroupClient::new(channel)
            .max_decoding_message_size(GROUP_MESSAGE_BYTES)
            .max_encoding_message_size(GROUP_MESSAGE_BYTES);
        let (down_tx, down_rx) = tokio::sync::mpsc::unbounded_channel();
        let hello = pb::GroupDown {
            body: Some(DownBody::Hello(pb::GroupHello { epoch, rank: rank as u32, degree: degree as u32 })),
        };
        let outbound =
            tokio_stream::once(hello).chain(UnboundedReceiverStream::new(down_rx).map(down_message));
        let mut inbound =
            client.follow(outbound).await.map_err(|s| WorkerError::rpc(address.clone(), s))?.into_inner();
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(m)) => up(m),
                    Ok(None) => Err("the member closed its stream".to_string()),
                    Err(s) => Err(format!("the stream broke: {}", s.message())),
                };
                let end = next.is_err();
                if up_tx.send(next).is_err() || end {
                    break;
                }
            }
        });
        links.push(MemberLink { rank, down: down_tx, up: Mutex::new(up_rx) });
    }
    Ok(Leader { epoch, members: links })
}
