//! A [`Collective`] between processes over TCP (loopback): the ranks of a
//! data-parallel run started as one process each (`lcasr train --processes`,
//! `super::processes`) exchange through rank 0, which receives every rank's
//! values, combines them in rank order exactly as the in-process group does
//! (so a run gives the same bits as with threads) and sends the result back. Rank 0 is also where the ranks meet: it
//! listens, the others connect and say who they are.
//!
//! The standard library's sockets are all this needs; the volumes are one
//! gradient bucket at a time, on one machine. A rank whose process ends
//! closes its socket, so the others' exchanges fail with [`RankLeft`]
//! instead of waiting; rank 0 tells the rest which rank left first.

use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::collective::{
    combine, exchanges_via_payloads, Collective, Kind, Payload, PayloadExchange, RankLeft,
};

/// The first bytes a rank sends when it connects.
const HELLO: &[u8; 8] = b"lcasr-dp";

/// Reply tags from rank 0. Messages are read unbuffered, each part with
/// one `read_exact` (a payload in one piece).
const REPLY_OK: u8 = 0;
const REPLY_ERR: u8 = 1;
const REPLY_LEFT: u8 = 2;

/// Rank 0's side: a stream per other rank, by rank.
pub struct TcpRoot {
    world: usize,
    /// `peers[r - 1]` is rank r's stream; `None` once closed.
    peers: Mutex<Vec<Option<TcpStream>>>,
    /// The first rank that left the group.
    left: Mutex<Option<usize>>,
}

/// The side of rank r > 0: its stream to rank 0.
pub struct TcpMember {
    rank: usize,
    world: usize,
    stream: Mutex<TcpStream>,
}

/// Listens for the other ranks of a group on a loopback port.
pub struct Rendezvous {
    listener: TcpListener,
}

impl Rendezvous {
    /// A listener on a free loopback port.
    pub fn new() -> Result<Self> {
        let listener =
            TcpListener::bind(("127.0.0.1", 0)).context("cannot listen on a loopback port")?;
        Ok(Self { listener })
    }

    /// Where the other ranks connect (`127.0.0.1:port`).
    pub fn address(&self) -> Result<String> {
        Ok(self.listener.local_addr()?.to_string())
    }

    /// Waits until ranks 1..world have connected (at most `timeout`),
    /// calling `check` between tries (it fails when a rank's process ended
    /// before connecting). Returns rank 0's side of the group.
    pub fn accept(
        self,
        world: usize,
        timeout: Duration,
        mut check: impl FnMut() -> Result<()>,
    ) -> Result<TcpRoot> {
        self.listener.set_nonblocking(true)?;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let deadline = Instant::now() + timeout;
        while peers.iter().any(Option::is_none) {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let rank = read_hello(&mut stream, world)?;
                    stream.set_read_timeout(None)?;
                    stream.set_nodelay(true)?;
                    let slot = &mut peers[rank - 1];
                    if slot.is_some() {
                        bail!("rank {rank} connected twice");
                    }
                    *slot = Some(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    check()?;
                    if Instant::now() > deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|r| peers[r - 1].is_none()).collect();
                        bail!(
                            "ranks {missing:?} did not connect within {} s",
                            timeout.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("cannot accept a rank's connection"),
            }
        }
        Ok(TcpRoot {
            world,
            peers: Mutex::new(peers),
            left: Mutex::new(None),
        })
    }
}

/// Reads a connecting rank's greeting: its rank, checked against `world`.
fn read_hello(stream: &mut TcpStream, world: usize) -> Result<usize> {
    let mut hello = [0u8; 8];
    stream.read_exact(&mut hello)?;
    if &hello != HELLO {
        bail!("a connection that is not an lcasr rank");
    }
    let (rank, their_world) = (read_u64(stream)? as usize, read_u64(stream)? as usize);
    if their_world != world || rank == 0 || rank >= world {
        bail!("a rank announced itself as rank {rank} of {their_world}, expected 1..{world}");
    }
    Ok(rank)
}

impl TcpMember {
    /// Connects rank `rank` of `world` to rank 0 at `address`.
    pub fn connect(address: &str, rank: usize, world: usize) -> Result<Self> {
        let mut stream = TcpStream::connect(address)
            .with_context(|| format!("rank {rank} cannot reach rank 0 at {address}"))?;
        stream.set_nodelay(true)?;
        stream.write_all(HELLO)?;
        write_u64(&mut stream, rank as u64)?;
        write_u64(&mut stream, world as u64)?;
        Ok(Self {
            rank,
            world,
            stream: Mutex::new(stream),
        })
    }

    fn stream(&self) -> MutexGuard<'_, TcpStream> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpRoot {
    fn peers(&self) -> MutexGuard<'_, Vec<Option<TcpStream>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `rank` left (if none did before), tells the other ranks
    /// which rank left first and closes every stream. Returns that rank.
    ///
    /// The streams stay open for reading until rank 0's side is dropped: a
    /// rank still sending its next call must not meet a reset, which could
    /// cost it the message naming the rank that left.
    fn leave(&self, rank: usize, peers: &mut [Option<TcpStream>]) -> usize {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        let told = left.is_some();
        let first = *left.get_or_insert(rank);
        if !told {
            for stream in peers.iter().flatten() {
                let mut w = BufWriter::new(stream);
                // The rank may be gone too: nothing to do about a failed write.
                let _ = w.write_all(&[REPLY_LEFT]);
                let _ = write_u64(&mut w, first as u64);
                let _ = w.flush();
                drop(w);
                let _ = stream.shutdown(Shutdown::Write);
            }
        }
        first
    }
}

impl Drop for TcpRoot {
    /// Reads what the other ranks sent and nobody will read before closing,
    /// so that the close is an orderly one rather than a reset.
    fn drop(&mut self) {
        for stream in self.peers().iter().flatten() {
            if stream.set_nonblocking(true).is_ok() {
                let mut buf = [0u8; 4096];
                while matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {}
            }
        }
    }
}

impl PayloadExchange for TcpRoot {
    fn exchange(&self, kind: Kind, payload: Payload) -> Result<Payload> {
        let mut peers = self.peers();
        if let Some(rank) = *self.left.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err(RankLeft { rank }.into());
        }
        let mut calls = Vec::with_capacity(self.world);
        calls.push((kind, payload));
        for rank in 1..self.world {
            let call = peers[rank - 1]
                .as_ref()
                .ok_or_else(|| anyhow!("rank {rank}'s connection is closed"))
                .and_then(|mut s| read_call(&mut s));
            match call {
                Ok(call) => calls.push(call),
                Err(_) => {
                    let first = self.leave(rank, &mut peers);
                    return Err(RankLeft { rank: first }.into());
                }
            }
        }
        let result = combine(&calls);
        for stream in peers.iter().flatten() {
            // A rank that is gone shows at its next call's read.
            let _ = write_reply(stream, &result);
        }
        result.map_err(|e| anyhow!("{e}"))
    }
}

impl PayloadExchange for TcpMember {
    fn exchange(&self, kind: Kind, payload: Payload) -> Result<Payload> {
        let stream = self.stream();
        let mut w = BufWriter::new(&*stream);
        // Rank 0 may already have said that a rank left (then this call's
        // values go nowhere): the reply tells, whatever the send did.
        let _ = write_call(&mut w, kind, &payload).and_then(|()| Ok(w.flush()?));
        drop(w);
        // Unbuffered: a buffer could swallow the bytes of a message that
        // follows this reply (rank 0's word that a rank left).
        match read_reply(&mut &*stream) {
            Ok(Reply::Done(p)) => Ok(p),
            Ok(Reply::Failed(e)) => Err(anyhow!("{e}")),
            Ok(Reply::Left(rank)) => Err(RankLeft { rank }.into()),
            Err(_) => Err(RankLeft { rank: 0 }.into()),
        }
    }
}

impl Collective for TcpRoot {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        self.world
    }

    exchanges_via_payloads!();

    fn abort_group(&self) {
        let mut peers = self.peers();
        self.leave(0, &mut peers);
    }
}

impl Collective for TcpMember {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    exchanges_via_payloads!();

    fn abort_group(&self) {
        let _ = self.stream().shutdown(Shutdown::Both);
    }
}

/// What rank 0 answers a call with.
enum Reply {
    Done(Payload),
    Failed(String),
    Left(usize),
}

fn write_u64(w: &mut impl Write, v: u64) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn write_call(w: &mut impl Write, kind: Kind, payload: &Payload) -> Result<()> {
    let (tag, root) = match kind {
        Kind::SumF32 => (0u8, 0),
        Kind::SumF64 => (1, 0),
        Kind::Broadcast(root) => (2, root as u64),
        Kind::Barrier => (3, 0),
    };
    w.write_all(&[tag])?;
    write_u64(w, root)?;
    write_payload(w, payload)
}

fn read_call(r: &mut impl Read) -> Result<(Kind, Payload)> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag)?;
    let root = read_u64(r)? as usize;
    let kind = match tag[0] {
        0 => Kind::SumF32,
        1 => Kind::SumF64,
        2 => Kind::Broadcast(root),
        3 => Kind::Barrier,
        t => bail!("unknown collective call {t}"),
    };
    Ok((kind, read_payload(r)?))
}

fn write_payload(w: &mut impl Write, payload: &Payload) -> Result<()> {
    match payload {
        Payload::F32(v) => {
            w.write_all(&[0])?;
            write_u64(w, v.len() as u64)?;
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        Payload::F64(v) => {
            w.write_all(&[1])?;
            write_u64(w, v.len() as u64)?;
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        Payload::Len(n) => {
            w.write_all(&[2])?;
            write_u64(w, *n as u64)?;
        }
    }
    Ok(())
}

fn read_payload(r: &mut impl Read) -> Result<Payload> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag)?;
    let n = read_u64(r)? as usize;
    Ok(match tag[0] {
        0 => {
            let mut bytes = vec![0u8; n * 4];
            r.read_exact(&mut bytes)?;
            Payload::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect(),
            )
        }
        1 => {
            let mut bytes = vec![0u8; n * 8];
            r.read_exact(&mut bytes)?;
            Payload::F64(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        2 => Payload::Len(n),
        t => bail!("unknown payload {t}"),
    })
}

fn write_reply(stream: &TcpStream, result: &std::result::Result<Payload, String>) -> Result<()> {
    let mut w = BufWriter::new(stream);
    match result {
        Ok(p) => {
            w.write_all(&[REPLY_OK])?;
            write_payload(&mut w, p)?;
        }
        Err(e) => {
            w.write_all(&[REPLY_ERR])?;
            write_u64(&mut w, e.len() as u64)?;
            w.write_all(e.as_bytes())?;
        }
    }
    w.flush()?;
    Ok(())
}

fn read_reply(r: &mut impl Read) -> Result<Reply> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag)?;
    Ok(match tag[0] {
        REPLY_OK => Reply::Done(read_payload(r)?),
        REPLY_ERR => {
            let mut bytes = vec![0u8; read_u64(r)? as usize];
            r.read_exact(&mut bytes)?;
            Reply::Failed(String::from_utf8_lossy(&bytes).into_owned())
        }
        REPLY_LEFT => Reply::Left(read_u64(r)? as usize),
        t => bail!("unknown reply {t}"),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A group of `world` ranks over loopback TCP, each rank on a thread
    /// running `body`, results in rank order.
    fn on_tcp_ranks<T: Send>(
        world: usize,
        body: impl Fn(Arc<dyn Collective>) -> T + Sync,
    ) -> Vec<T> {
        let rendezvous = Rendezvous::new().unwrap();
        let address = rendezvous.address().unwrap();
        std::thread::scope(|s| {
            let members: Vec<_> = (1..world)
                .map(|rank| {
                    let (address, body) = (address.clone(), &body);
                    s.spawn(move || {
                        let comm = TcpMember::connect(&address, rank, world).unwrap();
                        body(Arc::new(comm))
                    })
                })
                .collect();
            let root = rendezvous
                .accept(world, Duration::from_secs(10), || Ok(()))
                .unwrap();
            let mut out = vec![body(Arc::new(root))];
            out.extend(members.into_iter().map(|h| h.join().unwrap()));
            out
        })
    }

    #[test]
    fn sums_broadcasts_and_barriers_match_the_in_process_group() {
        let run = |comm: Arc<dyn Collective>| -> Vec<f64> {
            let r = comm.rank() as f32;
            let mut a = vec![0.1 * (r + 1.0), 1e8, -1e8 + r, 1.0 / (r + 3.0)];
            comm.all_reduce_sum(&mut a).unwrap();
            let mut b = vec![r as f64 * 0.3; 3];
            comm.all_reduce_sum_f64(&mut b).unwrap();
            let mut c = vec![r; 5];
            comm.broadcast(&mut c, 2).unwrap();
            comm.barrier().unwrap();
            let mut empty: [f32; 0] = [];
            comm.all_reduce_sum(&mut empty).unwrap();
            a.iter()
                .map(|&v| v as f64)
                .chain(b)
                .chain(c.iter().map(|&v| v as f64))
                .collect()
        };
        let tcp = on_tcp_ranks(3, run);
        let comms = crate::parallel::InProcessGroup::with_ranks(3).unwrap();
        let threads: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| s.spawn(move || run(Arc::new(c))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (a, b)) in tcp.iter().zip(&threads).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "rank {rank}: {a:?} vs {b:?}");
        }
        assert_eq!(tcp[0][7..], [2.0; 5], "rank 2's values broadcast");
    }

    #[test]
    fn disagreeing_calls_and_leaving_ranks_fail_every_rank() {
        let results = on_tcp_ranks(3, |comm| {
            let mut v = vec![1.0f32; 2 + comm.rank() % 2];
            comm.all_reduce_sum(&mut v).map_err(|e| e.to_string())
        });
        for r in &results {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("disagree"), "{e}");
        }
        // Rank 1 leaves after one call: the others' next call names it.
        let results = on_tcp_ranks(3, |comm| {
            comm.barrier().unwrap();
            if comm.rank() == 1 {
                comm.abort_group();
                return None;
            }
            let err = comm.barrier().unwrap_err();
            Some(err.downcast_ref::<RankLeft>().map(|l| l.rank))
        });
        assert_eq!(results, [Some(Some(1)), None, Some(Some(1))]);
    }
}
