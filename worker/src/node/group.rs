//! The tensor placement on a worker: the [`Collective`] of a group whose
//! members are processes joined by one socket from rank 0 to each other
//! member (set up through `TensorGroup.Follow`; frames in `rpc::group`).
//!
//! Rank 0 ([`Leader`]) runs the batching loop as under the gather placement:
//! it admits the coordinator's sequences, and before every step it sends each
//! member an [`Order`] (who joined, who left, the step's sequences in order).
//! Every member then runs the same forward over its shard; at each sum the
//! members send their partial output up, rank 0 adds them in rank order and
//! sends the sum down (a pair with a small sum swaps parts instead, and each
//! adds them in rank order: [`pairs`]); the logits' vocabulary rows go up, rank 0 samples, and
//! the chosen tokens go down. A member ([`follow`]) keeps the same sequences
//! (prompts, tokens, its heads' KV cache) without sampling.
//!
//! The batching threads read and write the sockets themselves: a layer waits
//! on each exchange, so no task or channel sits in between (measured: a
//! stream through the async runtime cost ~0.4 ms per exchange on loopback,
//! ~13 ms of every 270M-shape decode step), and a read within a step polls
//! the socket briefly before it sleeps (see `rpc::group`). A member silent for
//! [`EXCHANGE_TIMEOUT`] fails the step ([`EngineError::Group`]); its sequences
//! are resumed by the coordinator once the group is planned again.
use std::collections::HashMap;
use std::time::Duration;

use crate::rpc::group::Wire;
use zeroshard_engine::engine::{Engine, GenerationParams, ScoreRequest, Sequence};
use zeroshard_engine::tensor::{sum_in_order, Collective};
use zeroshard_engine::{Backend, EngineError};

/// Longest wait for a member's part of one exchange.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest sum a pair exchanges both ways at once (see [`pairs`]); larger
/// ones go through rank 0. Each end writes its whole part before it reads
/// the other's, so both parts must fit in the socket's buffers together.
pub(crate) const PAIR_BYTES: usize = 32 << 10;

/// Whether a group of `degree` sums `values` by swapping the two parts
/// (every member adds them in rank order itself: one trip instead of rank
/// 0's two, and no member waits for another's addition).
pub(crate) fn pairs(degree: usize, values: usize) -> bool {
    degree == 2 && values * 4 <= PAIR_BYTES
}

/// Rank 0 → member.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Down {
    Order(Order),
    Sum(Vec<f32>),
    /// Rank 0's own part of a pair's sum ([`pairs`]).
    Partial(Vec<f32>),
    Tokens(Vec<u32>),
}

/// Member → rank 0.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Up {
    Partial(Vec<f32>),
    Logits(Vec<f32>),
}

/// The next step, as rank 0 orders it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Order {
    pub joined: Vec<Joined>,
    pub left: Vec<u64>,
    /// The step's sequences, in step order.
    pub step: Vec<u64>,
}

/// A sequence a member starts keeping.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Joined {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub ignore_eos: bool,
    /// A scored sequence's first scored position (see `Sequence::scoring`):
    /// every member computes those rows of the head.
    pub score_from: Option<usize>,
}

fn group_error(what: impl Into<String>) -> EngineError {
    EngineError::Group(what.into())
}

/// Rank 0's end of one member's socket.
pub(crate) struct MemberLink {
    pub rank: usize,
    pub wire: Wire,
}

/// Rank 0 of a group: the links to members 1.., in rank order.
pub(crate) struct Leader {
    pub epoch: u64,
    pub members: Vec<MemberLink>,
    /// Where the time spent waiting for members' parts is counted (as the
    /// worker's gather wait: what a step waits for other workers).
    pub stats: std::sync::Arc<super::gather::GatherStats>,
}

impl Leader {
    fn recv(&self, m: &MemberLink) -> zeroshard_engine::Result<Up> {
        let t = std::time::Instant::now();
        let up = m.wire.recv_up();
        self.stats.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        up
    }
}

impl Leader {
    /// Sends every member the next step's order.
    pub(crate) fn order(&self, o: &Order) -> zeroshard_engine::Result<()> {
        let d = Down::Order(o.clone());
        self.members.iter().try_for_each(|m| m.wire.send_down(&d))
    }
}

impl Collective for Leader {
    fn rank(&self) -> usize {
        0
    }

    fn degree(&self) -> usize {
        self.members.len() + 1
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> zeroshard_engine::Result<()> {
        let pair = pairs(self.degree(), x.len());
        if pair {
            self.members[0].wire.send_down(&Down::Partial(x.to_vec()))?;
        }
        let mut parts = vec![x.to_vec()];
        for m in &self.members {
            match self.recv(m)? {
                Up::Partial(p) if p.len() == x.len() => parts.push(p),
                other => {
                    return Err(group_error(format!(
                        "member {} sent {} where a sum of {} values was due",
                        m.rank,
                        describe(&other),
                        x.len()
                    )))
                }
            }
        }
        let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        sum_in_order(x, &refs);
        if pair {
            return Ok(());
        }
        let d = Down::Sum(x.to_vec());
        self.members.iter().try_for_each(|m| m.wire.send_down(&d))
    }

    fn gather(&self, part: Vec<f32>) -> zeroshard_engine::Result<Option<Vec<Vec<f32>>>> {
        let mut parts = vec![part];
        for m in &self.members {
            match self.recv(m)? {
                Up::Logits(l) => parts.push(l),
                other => {
                    return Err(group_error(format!(
                        "member {} sent {} where logits were due",
                        m.rank,
                        describe(&other)
                    )))
                }
            }
        }
        Ok(Some(parts))
    }

    fn broadcast_tokens(&self, tokens: &mut Vec<u32>) -> zeroshard_engine::Result<()> {
        let d = Down::Tokens(tokens.clone());
        self.members.iter().try_for_each(|m| m.wire.send_down(&d))
    }
}

fn describe(up: &Up) -> String {
    match up {
        Up::Partial(p) => format!("a partial sum of {} values", p.len()),
        Up::Logits(l) => format!("{} logits", l.len()),
    }
}

/// A member's end of its socket from rank 0.
pub(crate) struct Member {
    pub rank: usize,
    pub degree: usize,
    pub epoch: u64,
    pub wire: Wire,
    /// Where the time spent waiting for rank 0 within a step is counted.
    pub stats: std::sync::Arc<super::gather::GatherStats>,
}

impl Member {
    fn recv(&self) -> zeroshard_engine::Result<Down> {
        let t = std::time::Instant::now();
        let next = self.wire.recv_down(None);
        self.stats.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(next?.expect("a read without idle returns a frame"))
    }
}

impl Collective for Member {
    fn rank(&self) -> usize {
        self.rank
    }

    fn degree(&self) -> usize {
        self.degree
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> zeroshard_engine::Result<()> {
        self.wire.send_up(&Up::Partial(x.to_vec()))?;
        match self.recv()? {
            Down::Sum(s) if s.len() == x.len() && !pairs(self.degree, x.len()) => {
                x.copy_from_slice(&s);
                Ok(())
            }
            Down::Partial(p) if p.len() == x.len() && pairs(self.degree, x.len()) => {
                let mine = x.to_vec();
                sum_in_order(x, &[&p, &mine]);
                Ok(())
            }
            other => {
                Err(group_error(format!("rank 0 sent {other:?} where a sum of {} values was due", x.len())))
            }
        }
    }

    fn gather(&self, part: Vec<f32>) -> zeroshard_engine::Result<Option<Vec<Vec<f32>>>> {
        self.wire.send_up(&Up::Logits(part))?;
        Ok(None)
    }

    fn broadcast_tokens(&self, tokens: &mut Vec<u32>) -> zeroshard_engine::Result<()> {
        match self.recv()? {
            Down::Tokens(t) => {
                *tokens = t;
                Ok(())
            }
            other => Err(group_error(format!("rank 0 sent {other:?} where tokens were due"))),
        }
    }
}

/// How long an idle member waits for the next order before it looks at its
/// own commands (a new plan, a drain).
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Why [`follow`] returned.
pub(crate) enum Followed {
    /// Rank 0 closed the socket (a new epoch, or it left).
    Closed,
    /// The batching loop has a command to handle.
    Interrupted,
    /// A step failed: the group cannot go on for this epoch.
    Failed(EngineError),
}

/// Runs a member's side of the group until rank 0 closes the stream, a step
/// fails, or `interrupted()` says the loop has its own work (checked while idle).
pub(crate) fn follow<B: Backend>(
    engine: &Engine<B>,
    member: &Member,
    seqs: &mut HashMap<u64, Sequence<B>>,
    stats: &super::batcher::BatchStats,
    mut interrupted: impl FnMut() -> bool,
) -> Followed {
    loop {
        let order = match member.wire.recv_down(Some(IDLE_POLL)) {
            Ok(Some(Down::Order(o))) => o,
            Ok(Some(other)) => {
                return Followed::Failed(group_error(format!("rank 0 sent {other:?} where an order was due")))
            }
            Ok(None) if interrupted() => return Followed::Interrupted,
            Ok(None) => continue,
            Err(EngineError::Group(e)) if e.ends_with("closed the group") => return Followed::Closed,
            Err(e) => return Followed::Failed(e),
        };
        for id in &order.left {
            seqs.remove(id);
        }
        for j in order.joined {
            let params = GenerationParams {
                sampling: Default::default(),
                max_new_tokens: j.max_new_tokens,
                ignore_eos: j.ignore_eos,
            };
            let scored = |s: Sequence<B>| match j.score_from {
                Some(from) => s.scoring(ScoreRequest { from, top: 0, tolerance: 0.0, sampled: false }),
                None => s,
            };
            match engine.new_sequence(j.prompt, params).map(scored) {
                Ok(s) => {
                    seqs.insert(j.id, s);
                }
                Err(e) => return Followed::Failed(e),
            }
        }
        if let Some(id) = order.step.iter().find(|id| !seqs.contains_key(id)) {
            return Followed::Failed(group_error(format!(
                "rank 0 ordered a step of sequence {id}, unknown here"
            )));
        }
        let mut by_id: HashMap<u64, &mut Sequence<B>> = seqs.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut batch: Vec<&mut Sequence<B>> = order.step.iter().filter_map(|id| by_id.remove(id)).collect();
        let started = std::time::Instant::now();
        if let Err(e) = engine.step_in_group(&mut batch, member, false) {
            return Followed::Failed(e);
        }
        use std::sync::atomic::Ordering::Relaxed;
        stats.step_nanos.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        stats.steps.fetch_add(1, Relaxed);
        seqs.retain(|_, s| s.finished().is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 0 and rank 1 of a pair over a plaintext loopback socket.
    fn pair() -> (Leader, Member) {
        let (leader_end, member_end) = crate::rpc::group::loopback_sockets(EXCHANGE_TIMEOUT);
        let stats = std::sync::Arc::new(super::super::gather::GatherStats::default());
        let leader = Leader {
            epoch: 1,
            members: vec![MemberLink {
                rank: 1,
                wire: Wire::new(leader_end, "member 1".into(), stats.clone()),
            }],
            stats: stats.clone(),
        };
        let member = Member {
            rank: 1,
            degree: 2,
            epoch: 1,
            wire: Wire::new(member_end, "rank 0".into(), stats.clone()),
            stats,
        };
        (leader, member)
    }

    /// A member's part of a sum: different on each rank and at each index.
    fn part(n: usize, rank: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + rank * 104_729) % 1000) as f32 * 1e-3 - rank as f32).collect()
    }

    #[test]
    fn a_pair_gets_the_same_sum_whether_it_swaps_parts_or_goes_through_rank_0() {
        let (leader, member) = pair();
        let swapped = PAIR_BYTES / 4;
        let sizes = [1, 1024, swapped, swapped + 1, 128 * 1024];
        assert!(pairs(2, swapped) && !pairs(2, swapped + 1) && !pairs(4, 1), "the sizes straddle the bound");
        let follower = std::thread::spawn(move || {
            sizes
                .iter()
                .map(|&n| {
                    let mut x = part(n, 1);
                    member.all_reduce_sum(&mut x).map(|()| x)
                })
                .collect::<Vec<_>>()
        });
        for &n in &sizes {
            let mut x = part(n, 0);
            leader.all_reduce_sum(&mut x).expect("rank 0 sums");
            let mut want = vec![0.0; n];
            sum_in_order(&mut want, &[&part(n, 0), &part(n, 1)]);
            assert_eq!(
                bytemuck::cast_slice::<f32, u32>(&x),
                bytemuck::cast_slice::<f32, u32>(&want),
                "rank 0, {n} values"
            );
        }
        for (got, &n) in follower.join().expect("member thread").into_iter().zip(&sizes) {
            let mut want = vec![0.0; n];
            sum_in_order(&mut want, &[&part(n, 0), &part(n, 1)]);
            let got = got.expect("member sums");
            assert_eq!(
                bytemuck::cast_slice::<f32, u32>(&got),
                bytemuck::cast_slice::<f32, u32>(&want),
                "member, {n} values"
            );
        }
    }
}
