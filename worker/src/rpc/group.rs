//! The tensor placement's connections: the `TensorGroup.Follow` rendezvous
//! (a member's end, [`follow`]; rank 0's, [`lead`]) and the socket it sets
//! up, over which the batching threads exchange frames themselves ([`Wire`]).
//!
//! A frame is a tag byte, a little-endian u32 length and the payload: an
//! order (a `GroupOrder` message), f32 values (little-endian, as computed:
//! a sum is the same bits on every member), or u32 tokens.
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tonic::Request;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::tensor_group_client::TensorGroupClient;
use zeroshard_security::{Role, Security, Socket};

use crate::error::{Result, WorkerError};
use crate::node::gather::GatherStats;
use crate::node::group::{Down, Joined, Leader, Member, MemberLink, Order, Up, EXCHANGE_TIMEOUT};
use crate::node::{Command, Node};
use zeroshard_engine::EngineError;
use zeroshard_offload::sync::lock;

/// How long a member waits for its own activation of the epoch rank 0 names,
/// and for rank 0's socket once it answered.
const PATIENCE: Duration = Duration::from_secs(30);

const ORDER: u8 = 1;
const SUM: u8 = 2;
const TOKENS: u8 = 3;
const PARTIAL: u8 = 4;
const LOGITS: u8 = 5;
const PARTIAL_DOWN: u8 = 6;
const ECHO: u8 = 7;

/// Most frames, and largest frame, one `Echo` sends back.
const ECHO_ROUNDS: u32 = 64;
const ECHO_BYTES: usize = 1 << 20;
/// How long an echo waits for its socket, and then for each frame.
const ECHO_PATIENCE: Duration = Duration::from_secs(10);
/// Round trips a link measurement times over an echo socket, and the bytes
/// each carries (one token's sum in a 1024-wide model).
const EXCHANGE_ROUNDS: u32 = 16;
const EXCHANGE_FRAME: usize = 4096;

/// How long a read within a step polls for the other end's frame before it
/// sleeps in the kernel: exchanges answer within tens to hundreds of
/// microseconds, and a wake-up from sleep costs about as much again (more in
/// a virtual machine), on every one of a step's 2 × layers sums. Measured on
/// a 2-core VM, 270M shape, 2 workers: decode at batch 8 went from 0.74–0.81
/// to 0.91–0.95 of one process (3 interleaved rounds). The poll yields the
/// core on every turn, so other threads of the machine still run.
const SPIN: Duration = Duration::from_micros(1000);

/// Largest frame: a step's activations (`[rows, hidden]` f32) or logits.
const FRAME_BYTES: usize = 1 << 30;

#[cfg(not(target_endian = "little"))]
compile_error!("the group wire sends f32 values as this host stores them: little-endian hosts only");

fn group_error(what: impl Into<String>) -> EngineError {
    EngineError::Group(what.into())
}

/// One end of a group's socket, used by one batching thread.
pub(crate) struct Wire {
    socket: Mutex<Box<dyn Socket>>,
    /// Who is at the other end, for errors.
    peer: String,
    /// Where the bytes it moves are counted.
    stats: Arc<GatherStats>,
    /// The largest frame it accepts.
    max_frame: usize,
}

impl Wire {
    pub(crate) fn new(socket: Box<dyn Socket>, peer: String, stats: Arc<GatherStats>) -> Self {
        Self { socket: Mutex::new(socket), peer, stats, max_frame: FRAME_BYTES }
    }

    /// A socket of a link measurement: small frames only, bytes not counted
    /// as the group's.
    fn for_echo(socket: Box<dyn Socket>, peer: String) -> Self {
        Self { max_frame: ECHO_BYTES, ..Self::new(socket, peer, Arc::default()) }
    }

    /// Sends back each of up to `rounds` frames, until the other end closes.
    fn echo(&self, rounds: u32) -> zeroshard_engine::Result<()> {
        for _ in 0..rounds {
            match self.read(None) {
                Ok(Some((ECHO, payload))) => self.write(ECHO, &payload)?,
                Ok(_) => return Err(group_error(format!("{} sent a frame that is not an echo", self.peer))),
                Err(EngineError::Group(e)) if e.ends_with("closed the group") => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The median round trip of `rounds` frames of `bytes` through an echo.
    fn time_echoes(&self, rounds: u32, bytes: usize) -> zeroshard_engine::Result<Duration> {
        let frame = vec![0u8; bytes];
        let mut took = Vec::with_capacity(rounds as usize);
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            self.write(ECHO, &frame)?;
            match self.read(None)? {
                Some((ECHO, p)) if p.len() == bytes => took.push(t.elapsed()),
                _ => return Err(group_error(format!("{} echoed something else", self.peer))),
            }
        }
        took.sort_unstable();
        Ok(took.get(took.len() / 2).copied().unwrap_or_default())
    }

    fn io(&self, e: std::io::Error) -> EngineError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                group_error(format!("{} sent nothing for {EXCHANGE_TIMEOUT:?}", self.peer))
            }
            ErrorKind::UnexpectedEof => group_error(format!("{} closed the group", self.peer)),
            _ => group_error(format!("{}: {e}", self.peer)),
        }
    }

    fn write(&self, tag: u8, payload: &[u8]) -> zeroshard_engine::Result<()> {
        let mut s = lock(&self.socket);
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.extend_from_slice(&head);
        frame.extend_from_slice(payload);
        s.write_all(&frame).and_then(|()| s.flush()).map_err(|e| self.io(e))?;
        self.stats.group_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The next frame; with `idle`, `Ok(None)` when none starts within it.
    fn read(&self, idle: Option<Duration>) -> zeroshard_engine::Result<Option<(u8, Vec<u8>)>> {
        let mut s = lock(&self.socket);
        let mut head = [0u8; 5];
        if let Some(t) = idle {
            s.set_read_timeout(t).map_err(|e| self.io(e))?;
            let first = s.read(&mut head[..1]);
            s.set_read_timeout(EXCHANGE_TIMEOUT).map_err(|e| self.io(e))?;
            match first {
                Ok(0) => return Err(self.io(ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(None),
                Err(e) => return Err(self.io(e)),
            }
            s.read_exact(&mut head[1..]).map_err(|e| self.io(e))?;
        } else {
            let until = std::time::Instant::now() + SPIN;
            while !s.readable().map_err(|e| self.io(e))? && std::time::Instant::now() < until {
                std::thread::yield_now();
            }
            s.read_exact(&mut head).map_err(|e| self.io(e))?;
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > self.max_frame {
            return Err(group_error(format!("{} sent a frame of {len} bytes", self.peer)));
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).map_err(|e| self.io(e))?;
        self.stats.group_received.fetch_add(5 + len as u64, Ordering::Relaxed);
        Ok(Some((head[0], payload)))
    }

    fn values(&self, payload: &[u8]) -> zeroshard_engine::Result<Vec<f32>> {
        if !payload.len().is_multiple_of(4) {
            return Err(group_error(format!("{} sent {} bytes, not whole values", self.peer, payload.len())));
        }
        Ok(payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Rank 0 → member.
    pub(crate) fn send_down(&self, d: &Down) -> zeroshard_engine::Result<()> {
        match d {
            Down::Order(o) => self.write(ORDER, &order_message(o).encode_to_vec()),
            Down::Sum(v) => self.write(SUM, bytemuck::cast_slice(v)),
            Down::Partial(v) => self.write(PARTIAL_DOWN, bytemuck::cast_slice(v)),
            Down::Tokens(t) => self.write(TOKENS, bytemuck::cast_slice(t)),
        }
    }

    /// What rank 0 sent next (`idle`: see [`Self::read`]).
    pub(crate) fn recv_down(&self, idle: Option<Duration>) -> zeroshard_engine::Result<Option<Down>> {
        let Some((tag, payload)) = self.read(idle)? else { return Ok(None) };
        Ok(Some(match tag {
            ORDER => Down::Order(order(
                pb::GroupOrder::decode(&payload[..])
                    .map_err(|e| group_error(format!("{} sent an undecodable order: {e}", self.peer)))?,
            )),
            SUM => Down::Sum(self.values(&payload)?),
            PARTIAL_DOWN => Down::Partial(self.values(&payload)?),
            TOKENS => Down::Tokens(
                payload.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            ),
            other => {
                return Err(group_error(format!("{} sent frame {other} where rank 0's were due", self.peer)))
            }
        }))
    }

    /// Member → rank 0.
    pub(crate) fn send_up(&self, u: &Up) -> zeroshard_engine::Result<()> {
        match u {
            Up::Partial(v) => self.write(PARTIAL, bytemuck::cast_slice(v)),
            Up::Logits(v) => self.write(LOGITS, bytemuck::cast_slice(v)),
        }
    }

    /// What the member sent next.
    pub(crate) fn recv_up(&self) -> zeroshard_engine::Result<Up> {
        let (tag, payload) = self.read(None)?.expect("a read without idle returns a frame");
        match tag {
            PARTIAL => Ok(Up::Partial(self.values(&payload)?)),
            LOGITS => Ok(Up::Logits(self.values(&payload)?)),
            other => Err(group_error(format!("{} sent frame {other} where a member's were due", self.peer))),
        }
    }
}

fn order_message(o: &Order) -> pb::GroupOrder {
    pb::GroupOrder {
        joined: o
            .joined
            .iter()
            .map(|j| pb::GroupSequence {
                id: j.id,
                prompt_token_ids: j.prompt.clone(),
                max_new_tokens: j.max_new_tokens as u32,
                ignore_eos: j.ignore_eos,
                score_from: j.score_from.map(|f| f as u32),
            })
            .collect(),
        left: o.left.clone(),
        step: o.step.clone(),
    }
}

fn order(o: pb::GroupOrder) -> Order {
    Order {
        joined: o
            .joined
            .into_iter()
            .map(|j| Joined {
                id: j.id,
                prompt: j.prompt_token_ids,
                max_new_tokens: j.max_new_tokens as usize,
                ignore_eos: j.ignore_eos,
                score_from: j.score_from.map(|f| f as usize),
            })
            .collect(),
        left: o.left,
        step: o.step,
    }
}

/// A member's end of `Follow`: checks the hello against the epoch this worker
/// activated, opens a port on the address rank 0 called, and, once rank 0's
/// socket is accepted (a worker's certificate under mTLS), hands it to the
/// batching loop.
pub(crate) async fn follow(node: &Arc<Node>, req: Request<pb::GroupHello>) -> Result<pb::GroupReady> {
    let local = req.local_addr();
    let hello = req.into_inner();
    let (rank, degree) = (hello.rank as usize, hello.degree as usize);
    node.await_group(hello.epoch, rank, degree, PATIENCE).await?;
    let (listener, port) = open_port(local)?;
    let node = node.clone();
    tokio::task::spawn_blocking(move || {
        let security = node.cfg.security.clone();
        match security.accept_socket(&listener, PATIENCE, EXCHANGE_TIMEOUT) {
            Ok((_, Some(id))) if id.role != Role::Worker => {
                tracing::error!("epoch {}: a {id} connected to the group port; only rank 0 may", hello.epoch)
            }
            Ok((socket, _)) => node.send(Command::Follow(Member {
                rank,
                degree,
                epoch: hello.epoch,
                wire: Wire::new(socket, "rank 0".into(), node.stats.gather.clone()),
                stats: node.stats.gather.clone(),
            })),
            Err(e) => tracing::error!("epoch {}: rank 0 did not connect: {e}", hello.epoch),
        }
    });
    Ok(pb::GroupReady { port: u32::from(port) })
}

/// A port for one socket on the address a call came to.
fn open_port(local: Option<std::net::SocketAddr>) -> Result<(std::net::TcpListener, u16)> {
    let ip = local.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let listener = std::net::TcpListener::bind((ip, 0))
        .map_err(|source| WorkerError::Io { path: format!("a group port on {ip}").into(), source })?;
    let port =
        listener.local_addr().map_err(|source| WorkerError::Io { path: "group port".into(), source })?.port();
    Ok((listener, port))
}

/// The socket to `port` on the host of the member at `address`.
async fn connect_port(
    security: &Security,
    address: &str,
    port: u32,
    timeout: Duration,
) -> Result<Box<dyn Socket>> {
    let host = zeroshard_security::Address::parse(address).map_err(|e| WorkerError::rpc(address, e))?.host;
    let port = u16::try_from(port).map_err(|_| WorkerError::rpc(address, format!("group port {port}")))?;
    let sec = security.clone();
    tokio::task::spawn_blocking(move || sec.connect_socket(&host, port, timeout))
        .await
        .map_err(|e| WorkerError::Task { what: "connecting a group socket", source: e.into() })?
        .map_err(|e| WorkerError::rpc(address, e))
}

/// A member's end of `Echo`: opens a port as for `Follow` and echoes what
/// the worker that connects (a worker's certificate under mTLS) sends.
pub(crate) async fn echo(node: &Arc<Node>, req: Request<pb::EchoRequest>) -> Result<pb::GroupReady> {
    let (listener, port) = open_port(req.local_addr())?;
    let rounds = req.into_inner().rounds.min(ECHO_ROUNDS);
    let security = node.cfg.security.clone();
    tokio::task::spawn_blocking(move || {
        match security.accept_socket(&listener, ECHO_PATIENCE, ECHO_PATIENCE) {
            Ok((_, Some(id))) if id.role != Role::Worker => {
                tracing::warn!("a {id} connected to a link measurement's port; only workers may")
            }
            Ok((socket, _)) => {
                if let Err(e) = Wire::for_echo(socket, "a link measurement".into()).echo(rounds) {
                    tracing::debug!("echo: {e}");
                }
            }
            Err(e) => tracing::debug!("echo: nobody connected: {e}"),
        }
    });
    Ok(pb::GroupReady { port: u32::from(port) })
}

/// The median round trip of a small frame to the worker at `address` over
/// a socket like a group's (`Echo`): what one exchange of a sum waits.
pub(crate) async fn measure_exchange(security: &Security, address: &str) -> Result<Duration> {
    let channel = super::peer::connect(security, address).await?;
    let ready = TensorGroupClient::new(channel)
        .echo(pb::EchoRequest { rounds: EXCHANGE_ROUNDS })
        .await
        .map_err(|s| WorkerError::rpc(address, s))?
        .into_inner();
    let socket = connect_port(security, address, ready.port, ECHO_PATIENCE).await?;
    let peer = format!("the echo of {address}");
    tokio::task::spawn_blocking(move || {
        Wire::for_echo(socket, peer).time_echoes(EXCHANGE_ROUNDS, EXCHANGE_FRAME)
    })
    .await
    .map_err(|e| WorkerError::Task { what: "timing echoes", source: e.into() })?
    .map_err(|e| WorkerError::rpc(address, e.to_string()))
}

/// Rank 0's end: asks each other member (`(rank, address)`, in rank order)
/// to follow under `epoch` and connects to the port it opens.
pub(crate) async fn lead(
    security: &Security,
    epoch: u64,
    degree: usize,
    members: Vec<(usize, String)>,
    stats: Arc<GatherStats>,
) -> Result<Leader> {
    let mut links = Vec::with_capacity(members.len());
    for (rank, address) in members {
        let channel = super::peer::connect(security, &address).await?;
        let ready = TensorGroupClient::new(channel)
            .follow(pb::GroupHello { epoch, rank: rank as u32, degree: degree as u32 })
            .await
            .map_err(|s| WorkerError::rpc(address.clone(), s))?
            .into_inner();
        let socket = connect_port(security, &address, ready.port, EXCHANGE_TIMEOUT).await?;
        links.push(MemberLink {
            rank,
            wire: Wire::new(socket, format!("member {rank} ({address})"), stats.clone()),
        });
    }
    Ok(Leader { epoch, members: links, stats })
}

/// Both ends of a plaintext loopback socket (connecting, accepting), reads
/// timing out after `read_timeout`.
#[cfg(test)]
pub(crate) fn loopback_sockets(read_timeout: Duration) -> (Box<dyn Socket>, Box<dyn Socket>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepting =
        std::thread::spawn(move || Security::plaintext().accept_socket(&listener, PATIENCE, read_timeout));
    let near = Security::plaintext().connect_socket("127.0.0.1", port, read_timeout).expect("connects");
    let (far, _) = accepting.join().expect("thread").expect("accepts");
    (near, far)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a plaintext loopback socket, as echo wires.
    fn wires() -> (Wire, Wire) {
        let (near, far) = loopback_sockets(ECHO_PATIENCE);
        // Each wire is named for the end it talks to.
        (Wire::for_echo(near, "far".into()), Wire::for_echo(far, "near".into()))
    }

    #[test]
    fn an_echo_answers_its_rounds_then_closes_and_refuses_big_frames() {
        let (near, far) = wires();
        let echoing = std::thread::spawn(move || far.echo(3));
        let rtt = near.time_echoes(3, EXCHANGE_FRAME).expect("three round trips");
        assert!(rtt > Duration::ZERO && rtt < ECHO_PATIENCE, "{rtt:?}");
        echoing.join().expect("thread").expect("echoed");
        let after = near.time_echoes(1, 8).expect_err("the echo closed after its rounds");
        assert!(after.to_string().contains("far closed"), "{after}");

        let (near, far) = wires();
        let echoing = std::thread::spawn(move || far.echo(3));
        // The echo reads the length and stops: the write may or may not finish.
        let _ = near.write(ECHO, &vec![0u8; ECHO_BYTES + 1]);
        let refused = echoing.join().expect("thread").expect_err("a frame over the bound");
        assert!(refused.to_string().contains(&format!("{} bytes", ECHO_BYTES + 1)), "{refused}");
    }
}
