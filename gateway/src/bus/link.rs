//! The gateway's NATS connection, written for one workload: tens of thousands of long-lived
//! single-subject subscriptions (one per device session), each quiet most of the time.
//!
//! A general client gives every subscription its own channel; in async-nats that is a tokio
//! mpsc whose first block (32 slots of 184 B) is allocated up front: 6.4 KB per device before
//! a single message arrives, more than everything else a session holds. Here a subscription is
//! a slot in a table keyed by its sid: the connection's reader parses `MSG`/`HMSG` and pushes
//! the message into the slot's queue, which allocates only while messages wait.
//!
//! Writes from every session go into one buffer that a single writer task flushes, so a burst
//! of uplink from thousands of devices becomes a few large socket writes. The buffer is bounded
//! ([`OUT_LIMIT`]): publishers wait for room, which slows the sessions' reading of their
//! devices: backpressure, never unbounded memory.
//!
//! `PING`/`PONG` is the server's own barrier: the server answers a `PING` only after processing
//! everything the connection sent before it. [`Link::ping`] turns that into the proof the
//! gateway needs before it ACKs an uplink message, with no subject involved.
//!
//! On a lost connection the link reconnects (rotating through the configured servers), sends
//! `SUB` again for every live subscription, and moves the connection epoch on so proofs taken
//! across the gap are refused. What was buffered but not written is discarded with the old
//! socket (it may have been half-written anyway); publishing while disconnected fails at once
//! instead of queueing toward an unknown future.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Headers, Msg, ServerOp, WireError};
use crate::common::Secret;
use crate::contract::subjects;
use crate::metrics::Metrics;

/// Most bytes waiting for the writer. At loopback speed this is a few milliseconds of traffic;
/// beyond it publishers wait (backpressure) rather than grow the buffer.
pub const OUT_LIMIT: usize = 8 * 1024 * 1024;
/// Most messages a subscription holds for a session that is not taking them; more are dropped
/// and counted as slow-consumer drops (the session's own byte limits normally act first).
pub const SLOT_LIMIT: usize = 64 * 1024;
/// Most bytes a subscription holds likewise. The reader never waits, so while a session is
/// held up (publishing into a full write buffer, say) its downlink queues here; the count
/// alone would let 64k messages of up to `max_payload` each pile up for one device.
pub const SLOT_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// TCP connect plus `INFO`/`CONNECT`/`PONG` handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Client keep-alive interval; a connection whose oldest unanswered `PING` is older than two
/// intervals is declared dead.
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Reconnect backoff: this much more per failed attempt (less up to a quarter, at random, so
/// gateways that lost the same server do not return in step)...
const BACKOFF_STEP: Duration = Duration::from_millis(100);
/// ...and at most this.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection must stay up this long before the backoff starts over. A server that completes
/// the handshake and then closes (full, shutting down, a proxy without a backend) otherwise
/// makes a tight loop, each round resubscribing every device and starting a reclaim sweep.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The largest `max_payload` believed from a server's `INFO` (nats-server's own ceiling): it
/// bounds what one announced message may make the reader buffer.
const MAX_PAYLOAD_CAP: usize = 64 * 1024 * 1024;
/// Allowance over `max_payload` for a delivered message (header + payload): servers of one
/// cluster may be configured with slightly different limits.
const MSG_SLACK: usize = 64 * 1024;
/// The subscription id of this connection's reply inbox (`<inbox>.*`).
const INBOX_SID: u64 = 1;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// Why an operation on the link failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// No connection to NATS right now (it is being re-established).
    #[error("not connected to NATS")]
    NotConnected,
    /// The message is larger than the server's `max_payload`.
    #[error("message of {len} bytes exceeds the NATS server's max_payload of {max}")]
    TooLarge {
        /// Header + payload bytes.
        len: usize,
        /// The server's limit.
        max: usize,
    },
    /// The link was closed (gateway shutdown).
    #[error("the NATS link is closed")]
    Closed,
    /// The server refused a publish (`-ERR 'Permissions Violation for Publish ...'`) while a
    /// [`Link::flush`] waited: the connection stays open, so without this the `PONG` would
    /// "confirm" a message the server dropped.
    #[error("the NATS server refused a publish (permissions violation)")]
    PublishRefused,
}

/// Outcome of a publish attempt that does not wait.
enum TryPublish {
    /// The write buffer is at [`OUT_LIMIT`].
    Full,
    /// It cannot be published at all.
    Failed(LinkError),
}

/// Why a request got no answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Nobody subscribes to the subject (the server said so at once).
    #[error("no responders")]
    NoResponders,
    /// No answer within the timeout.
    #[error("request timed out")]
    TimedOut,
    /// The connection was lost while waiting; the request may or may not have been delivered.
    #[error("NATS connection lost during the request")]
    Disconnected,
    /// It could not be sent.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Why the server list is unusable.
#[derive(Debug, thiserror::Error)]
#[error("NATS server address {url:?}: {reason}")]
pub struct AddressError {
    url: String,
    reason: String,
}

/// Credentials given in a server URL.
#[derive(Clone, PartialEq, Eq)]
enum UrlAuth {
    /// `user:pass@`.
    User(String, Secret),
    /// `token@`: a lone userinfo is an `auth_token`, as in every NATS client.
    Token(Secret),
}

/// One NATS server to dial.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAddr {
    host: String,
    port: u16,
    auth: Option<UrlAuth>,
    /// `tls://`: TLS is required even if the server does not ask for it.
    tls: bool,
}

impl ServerAddr {
    /// Whether this address asks for TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

impl std::fmt::Debug for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Parses a comma-separated server list: `nats://[user:pass@|token@]host[:port]`,
/// `tls://[user:pass@|token@]host[:port]` or `host[:port]`. With `tls://` the link refuses to talk
/// without TLS; with `nats://` it still upgrades when the server requires TLS.
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, AddressError> {
    let mut servers = Vec::new();
    for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let err = |reason: &str| AddressError {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (tls, rest) = match url.split_once("://") {
            Some(("nats", rest)) => (false, rest),
            Some(("tls", rest)) => (true, rest),
            Some((scheme, _)) => {
                return Err(err(&format!(
                    "scheme {scheme}:// is not supported (nats:// or tls://)"
                )));
            }
            None => (false, url),
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((creds, hostport)) => {
                let auth = match creds.split_once(':') {
                    Some((u, p)) => UrlAuth::User(u.to_owned(), Secret::new(p)),
                    None => UrlAuth::Token(Secret::new(creds)),
                };
                (Some(auth), hostport)
            }
            None => (None, rest),
        };
        let port_of = |p: &str| p.parse::<u16>().map_err(|_| err("port is not a number"));
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            // An IPv6 address: `[::1]` or `[::1]:4222`.
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| err("an IPv6 address needs its closing ]"))?;
            match after {
                "" => (host, 4222),
                _ => (
                    host,
                    port_of(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| err("expected :port after ]"))?,
                    )?,
                ),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) if !p.contains(':') => (h, port_of(p)?),
                Some(_) => return Err(err("an IPv6 address goes in brackets: [::1]:4222")),
                None => (hostport, 4222),
            }
        };
        if host.is_empty() {
            return Err(err("no host"));
        }
        servers.push(ServerAddr {
            host: host.to_owned(),
            port,
            auth,
            tls,
        });
    }
    if servers.is_empty() {
        return Err(AddressError {
            url: list.to_owned(),
            reason: "no server given".into(),
        });
    }
    Ok(servers)
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Servers, tried in turn.
    pub servers: Vec<ServerAddr>,
    /// The connection name the server shows in its monitoring.
    pub name: String,
    /// User and password for servers with accounts (a URL's own credentials take precedence).
    pub user: Option<(String, Secret)>,
    /// TLS client settings, used with `tls://` servers and servers that require TLS; `None`:
    /// plain TCP only (a server requiring TLS is then refused with a clear error).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The gateway's NATS connection; cheap to clone.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    options: LinkOptions,
    state: Mutex<State>,
    /// A writer waits here for bytes.
    wake_writer: Notify,
    /// Publishers wait here for room in the buffer.
    room: Notify,
    subs: Mutex<HashMap<u64, Arc<Slot>, SidHash>>,
    requests: Mutex<HashMap<u64, oneshot::Sender<Msg>, SidHash>>,
    next_sid: AtomicU64,
    next_token: AtomicU64,
    /// `devgate.inbox.<random>.`: replies to this link's requests arrive under it.
    inbox: String,
    max_payload: AtomicUsize,
    connected: watch::Sender<bool>,
    /// Why the last connection attempt failed, until one succeeds.
    last_error: Mutex<Option<String>>,
    epoch: AtomicU64,
    /// Publishes the server refused (permissions) on an open connection: part of
    /// [`Link::confirm_epoch`], since such a refusal comes back as a `-ERR`, not a closed socket.
    refused: AtomicU64,
    /// Messages for sids this link no longer has (each answered with an `UNSUB`).
    strays: AtomicU64,
    stop: CancellationToken,
    metrics: Metrics,
}

/// What the writer, the reader and the API share. One lock, held only to append bytes.
struct State {
    out: BytesMut,
    connected: bool,
    /// One entry per `PING` in flight, oldest first.
    pongs: VecDeque<PendingPong>,
}

/// A `PING` the server has not answered yet.
struct PendingPong {
    sent: Instant,
    /// Who waits for the `PONG`, if anyone.
    waiter: Option<oneshot::Sender<()>>,
    /// The sid whose `SUB` went right before this `PING`. The server answers in order, so a
    /// `-ERR` that arrives while this is the oldest `PING` in flight is about that `SUB`: how
    /// a refusal for the subscription limit, which names no subject, finds its subscription.
    after_sub: Option<u64>,
}

impl PendingPong {
    fn new(waiter: Option<oneshot::Sender<()>>) -> Self {
        PendingPong {
            sent: Instant::now(),
            waiter,
            after_sub: None,
        }
    }
}

/// Writes `SUB` and a `PING` right after it that remembers the sid (see
/// [`PendingPong::after_sub`]); the `PONG` costs the server a few bytes per subscription.
fn subscribe_marked(st: &mut State, subject: &str, sid: u64) {
    wire::subscribe(&mut st.out, subject, sid);
    wire::ping(&mut st.out);
    st.pongs.push_back(PendingPong {
        after_sub: Some(sid),
        ..PendingPong::new(None)
    });
}

/// Hashing for sids and request tokens: counters this process hands out, so no attacker
/// chooses them and SipHash's protection buys nothing; one multiply (Fibonacci hashing) spreads
/// sequential keys over the table. Looked up once per delivered message.
type SidHash = std::hash::BuildHasherDefault<SidHasher>;

/// See [`SidHash`].
#[derive(Default)]
struct SidHasher(u64);

impl std::hash::Hasher for SidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One subscription: its subject (to resubscribe after a reconnect) and its queue.
struct Slot {
    subject: Box<str>,
    queue: Mutex<SlotQueue>,
}

/// A subscription's queue held [`SLOT_LIMIT`] messages or [`SLOT_BYTES_LIMIT`] bytes: the
/// newest was dropped.
struct SlotFull;

#[derive(Default)]
struct SlotQueue {
    /// Allocated only while messages wait: an idle subscription owns no buffer.
    msgs: VecDeque<Msg>,
    /// What `msgs` hold, by [`Msg::size`].
    bytes: usize,
    waker: Option<Waker>,
    closed: bool,
    /// `UNSUB` sent by a drain that waits for its `PONG`: messages routed before it still
    /// arrive here, but a reconnect must not subscribe again.
    draining: bool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `msg` and returns the waiting task's waker, which the caller wakes once it has
    /// released its locks. `Err` if the message was dropped because the slot is full.
    fn push(&self, msg: Msg) -> Result<Option<Waker>, SlotFull> {
        let mut q = self.lock();
        if q.closed {
            return Ok(None);
        }
        let size = msg.size();
        // An empty queue takes any message: one larger than the byte limit (a server whose
        // max_payload exceeds it) still reaches the session, whose own limits answer it.
        let over_bytes = !q.msgs.is_empty() && q.bytes.saturating_add(size) > SLOT_BYTES_LIMIT;
        if q.msgs.len() >= SLOT_LIMIT || over_bytes {
            return Err(SlotFull);
        }
        q.bytes += size;
        q.msgs.push_back(msg);
        Ok(q.waker.take())
    }

    fn pop(q: &mut SlotQueue) -> Option<Msg> {
        let msg = q.msgs.pop_front();
        if let Some(msg) = &msg {
            q.bytes = q.bytes.saturating_sub(msg.size());
        }
        if q.msgs.is_empty() && q.msgs.capacity() > 0 {
            // Give the buffer back: most sessions see a message now and then, and an idle one
            // should cost nothing.
            q.msgs = VecDeque::new();
        }
        msg
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Msg>> {
        let mut q = self.lock();
        if let Some(msg) = Slot::pop(&mut q) {
            return Poll::Ready(Some(msg));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        match &q.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => q.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        if let Some(waker) = q.waker.take() {
            drop(q);
            waker.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few pushes/pops with no user code: a panic inside cannot
    // leave the data half-updated in a way that matters, so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn new(options: LinkOptions, metrics: Metrics) -> Arc<Inner> {
        let (connected, _) = watch::channel(false);
        Arc::new(Inner {
            options,
            state: Mutex::new(State {
                out: BytesMut::new(),
                connected: false,
                pongs: VecDeque::new(),
            }),
            wake_writer: Notify::new(),
            room: Notify::new(),
            subs: Mutex::new(HashMap::default()),
            requests: Mutex::new(HashMap::default()),
            next_sid: AtomicU64::new(INBOX_SID + 1),
            next_token: AtomicU64::new(1),
            inbox: format!("{}{}.", subjects::GATEWAY_INBOX_PREFIX, random_token()),
            max_payload: AtomicUsize::new(1024 * 1024),
            connected,
            last_error: Mutex::new(None),
            epoch: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            stop: CancellationToken::new(),
            metrics,
        })
    }
}

impl Link {
    /// Starts connecting in the background (retrying for as long as it takes) and returns at
    /// once: a gateway starts unready and becomes ready when NATS is there.
    pub fn start(options: LinkOptions, metrics: Metrics) -> Link {
        let inner = Inner::new(options, metrics);
        tokio::spawn(run(inner.clone()));
        Link { inner }
    }

    /// Why the last attempt to connect failed (`None` once connected): what an operator needs
    /// when the gateway stays unready, e.g. a TLS certificate the CA does not vouch for.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.inner.last_error).clone()
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.state).connected
    }

    /// A receiver that changes whenever the connection goes up or down.
    pub fn connected_watch(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// The connection generation, moved on by every (re)connect.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// Moves on with every (re)connect and with every refused publish that could be uplink:
    /// read it before publishing what must be confirmed; if it is unchanged after a later
    /// `PONG`, the message was accepted. Such a refusal does not say which message it was for,
    /// so it spoils every confirmation in flight (they are resent), which is rare: it takes a
    /// misconfigured permission. Refused replies, which are common, do not count.
    pub fn confirm_epoch(&self) -> u64 {
        // Both only grow, so the sum changes whenever either does.
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        epoch.wrapping_add(self.inner.refused.load(Ordering::Acquire))
    }

    /// Closes the connection for good: pending and future operations fail.
    pub fn close(&self) {
        self.inner.stop.cancel();
        self.inner.room.notify_waiters();
    }

    /// Subscribes to `subject`. The `SUB` is sent now if connected, and again after every
    /// reconnect for as long as the subscription lives. Anything this link publishes after this
    /// call reaches the server after the `SUB`.
    pub fn subscribe(&self, subject: &str) -> Subscription {
        let sid = self.inner.next_sid.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            subject: subject.into(),
            queue: Mutex::default(),
        });
        {
            let mut st = lock(&self.inner.state);
            lock(&self.inner.subs).insert(sid, slot.clone());
            if st.connected {
                subscribe_marked(&mut st, subject, sid);
            }
        }
        self.inner.wake_writer.notify_one();
        Subscription {
            inner: self.inner.clone(),
            sid,
            slot,
            active: true,
        }
    }

    /// Publishes a message, waiting for room in the write buffer if it is full.
    pub async fn publish(
        &self,
        subject: impl AsRef<[u8]>,
        reply: Option<&[u8]>,
        headers: Headers<'_>,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        let subject = subject.as_ref();
        match self.append(subject, reply, headers, payload, OUT_LIMIT) {
            Err(TryPublish::Full) => {
                // Rare (NATS slower than the gateway): the waiting state lives in its own
                // allocation, so the common path keeps every caller's future small, and with
                // it every session task.
                Box::pin(self.publish_when_room(subject, reply, headers, payload)).await
            }
            Err(TryPublish::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// Publishes without waiting: for answers and events whose number is bounded by work the
    /// gateway already accepted (replies to requests, presence events, announcements). They
    /// may take the buffer past [`OUT_LIMIT`]; only the uplink, the one producer the gateway
    /// does not bound itself, waits for room ([`Link::publish`]).
    pub fn publish_now(
        &self,
        subject: impl AsRef<[u8]>,
        reply: Option<&[u8]>,
        headers: Headers<'_>,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        match self.append(subject.as_ref(), reply, headers, payload, usize::MAX) {
            Err(TryPublish::Failed(e)) => Err(e),
            Err(TryPublish::Full) | Ok(()) => Ok(()),
        }
    }

    /// Appends the message unless the buffer holds `limit` bytes or more.
    fn append(
        &self,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: Headers<'_>,
        payload: &[u8],
        limit: usize,
    ) -> Result<(), TryPublish> {
        let len = headers.encoded_len() + payload.len();
        let max = self.inner.max_payload.load(Ordering::Relaxed);
        if len > max {
            return Err(TryPublish::Failed(LinkError::TooLarge { len, max }));
        }
        let mut st = lock(&self.inner.state);
        if self.inner.stop.is_cancelled() {
            return Err(TryPublish::Failed(LinkError::Closed));
        }
        if !st.connected {
            return Err(TryPublish::Failed(LinkError::NotConnected));
        }
        if st.out.len() >= limit {
            return Err(TryPublish::Full);
        }
        wire::publish(&mut st.out, subject, reply, headers, payload);
        drop(st);
        self.inner.wake_writer.notify_one();
        Ok(())
    }

    async fn publish_when_room(
        &self,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: Headers<'_>,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        loop {
            let room = self.inner.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a writer that makes room in between still wakes
            // this waiter.
            room.as_mut().enable();
            match self.append(subject, reply, headers, payload, OUT_LIMIT) {
                Err(TryPublish::Full) => room.await,
                Err(TryPublish::Failed(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Sends a request and waits for the first answer.
    pub async fn request(
        &self,
        subject: &str,
        headers: Headers<'_>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Msg, RequestError> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let mut reply = itoa::Buffer::new();
        let reply = format!("{}{}", self.inner.inbox, reply.format(token));
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.requests).insert(token, tx);
        let forget = || lock(&self.inner.requests).remove(&token);
        if let Err(e) = self
            .publish(subject, Some(reply.as_bytes()), headers, payload)
            .await
        {
            forget();
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(msg)) if msg.status() == Some(503) => Err(RequestError::NoResponders),
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(RequestError::Disconnected),
            Err(_) => {
                forget();
                Err(RequestError::TimedOut)
            }
        }
    }

    /// Sends `PING`; the receiver completes when the matching `PONG` arrives, i.e. once the
    /// server has processed everything this connection sent before. It fails (sender dropped)
    /// if the connection is lost first.
    pub fn ping(&self) -> Result<oneshot::Receiver<()>, LinkError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.inner.state);
            if !st.connected {
                return Err(LinkError::NotConnected);
            }
            wire::ping(&mut st.out);
            st.pongs.push_back(PendingPong::new(Some(tx)));
        }
        self.inner.wake_writer.notify_one();
        Ok(rx)
    }

    /// Waits until everything published so far has been processed by the server, or `limit`.
    /// Fails with [`LinkError::PublishRefused`] if the server refused a publish that could be
    /// uplink meanwhile (its `-ERR` comes before the `PONG`; refused replies and claims do not
    /// count, see `refusal_may_be_uplink`); a refusal that arrived before this call is not seen
    /// here (see [`Link::confirm_epoch`]).
    pub async fn flush(&self, limit: Duration) -> Result<(), LinkError> {
        let refused = self.inner.refused.load(Ordering::Acquire);
        let rx = self.ping()?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(())) if self.inner.refused.load(Ordering::Acquire) == refused => Ok(()),
            Ok(Ok(())) => Err(LinkError::PublishRefused),
            _ => Err(LinkError::NotConnected),
        }
    }
}

/// One subscription. Dropping it unsubscribes.
pub struct Subscription {
    inner: Arc<Inner>,
    sid: u64,
    slot: Arc<Slot>,
    active: bool,
}

impl Subscription {
    /// The next message; `None` once the subscription is closed and its queue is empty.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<Msg> {
        std::future::poll_fn(|cx| self.slot.poll_next(cx)).await
    }

    /// Puts `msgs` back in front of the queue, in their order, ahead of anything that arrived
    /// since: messages taken out early (during a login) are then handled as if never taken.
    /// Not bounded by [`SLOT_LIMIT`] or [`SLOT_BYTES_LIMIT`]: they were accepted already.
    pub fn requeue_front(&mut self, msgs: Vec<Msg>) {
        if msgs.is_empty() {
            return;
        }
        let mut q = self.slot.lock();
        for msg in msgs.into_iter().rev() {
            q.bytes += msg.size();
            q.msgs.push_front(msg);
        }
    }

    /// Whether the link ended this subscription (the server refused it, or the link stopped):
    /// nothing more will arrive, though messages already queued may still be taken.
    pub fn is_ended(&self) -> bool {
        self.slot.lock().closed
    }

    /// A message already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Msg> {
        Slot::pop(&mut self.slot.lock())
    }

    /// Stops the interest and waits until the server confirms it: after this, every message
    /// the server routed here is in the queue ([`Subscription::next`] yields them, then
    /// `None`) and no other will come. Fails (having stopped the interest locally) when the
    /// connection is down, since the server's view cannot be confirmed then.
    pub async fn drain(&mut self, limit: Duration) -> Result<(), LinkError> {
        if !self.active {
            return Ok(());
        }
        // Decided under the state lock, which `on_connect` holds while it resubscribes: either
        // the sid is marked draining (and the reconnect skips it) or it is gone already.
        let confirmed = {
            let mut st = lock(&self.inner.state);
            if st.connected {
                self.slot.lock().draining = true;
                wire::unsubscribe(&mut st.out, self.sid);
                wire::ping(&mut st.out);
                let (tx, rx) = oneshot::channel();
                st.pongs.push_back(PendingPong::new(Some(tx)));
                Some(rx)
            } else {
                lock(&self.inner.subs).remove(&self.sid);
                None
            }
        };
        self.inner.wake_writer.notify_one();
        let result = match confirmed {
            Some(rx) => match tokio::time::timeout(limit, rx).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(LinkError::NotConnected),
            },
            None => Err(LinkError::NotConnected),
        };
        self.forget();
        result
    }

    /// Stops the interest now; messages already queued can still be taken with
    /// [`Subscription::try_next`].
    pub fn unsubscribe(&mut self) {
        if !self.active {
            return;
        }
        {
            // Removed in the same critical section that writes `UNSUB`: were the sid still in
            // the table after the lock is released, a reconnect in between would send `SUB` for
            // it again and nothing would ever unsubscribe it.
            let mut st = lock(&self.inner.state);
            lock(&self.inner.subs).remove(&self.sid);
            if st.connected {
                wire::unsubscribe(&mut st.out, self.sid);
            }
        }
        self.inner.wake_writer.notify_one();
        self.forget();
    }

    fn forget(&mut self) {
        self.active = false;
        lock(&self.inner.subs).remove(&self.sid);
        self.slot.close();
    }

    /// The subject subscribed to.
    pub fn subject(&self) -> &str {
        &self.slot.subject
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.unsubscribe();
    }
}

fn random_token() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..22)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Why a connection ended or could not be made.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("server refused the connection: {0}")]
    Refused(String),
    #[error("timed out")]
    Timeout,
    #[error("server closed the connection")]
    Closed,
    #[error("no PONG for {0:?}: connection is stale")]
    Stale(Duration),
    #[error("unexpected handshake: {0}")]
    Handshake(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Marks the link down for good and ends every subscription when [`run`] ends, however it
/// ends: were a panic to end it while connected, the link would report itself up forever
/// (gateway ready, uplink appended to a buffer no task writes).
struct Teardown<'a>(&'a Inner);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let inner = self.0;
        inner.stop.cancel();
        inner.on_disconnect();
        let slots: Vec<_> = lock(&inner.subs).drain().map(|(_, s)| s).collect();
        for slot in slots {
            slot.close();
        }
    }
}

/// How long to wait before connection attempt number `attempt` + 1 (0: at once).
fn backoff(attempt: u32) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    (BACKOFF_STEP * attempt)
        .min(MAX_BACKOFF)
        .mul_f64(rand::random_range(0.75..=1.0))
}

/// Connects, serves, reconnects, until closed.
async fn run(inner: Arc<Inner>) {
    let _teardown = Teardown(&inner);
    let servers = inner.options.servers.clone();
    let mut attempt: u32 = 0;
    let mut index = 0;
    loop {
        let server = &servers[index % servers.len()];
        let result = tokio::select! {
            () = inner.stop.cancelled() => break,
            r = handshake(&inner, server) => r,
        };
        match result {
            Ok((stream, leftover)) => {
                inner.on_connect();
                let since = Instant::now();
                tracing::info!(server = ?server, "NATS connected");
                let ended = serve(&inner, stream, leftover).await;
                inner.on_disconnect();
                let up_for = since.elapsed();
                if up_for >= STABLE_AFTER {
                    attempt = 0;
                } else {
                    // Up only briefly: this server is not really serving; back off as after
                    // a failed attempt, and try the next one.
                    attempt = attempt.saturating_add(1);
                    index += 1;
                }
                match ended {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::warn!(server = ?server, %error, up_ms = up_for.as_millis() as u64, attempt, "NATS disconnected: sessions kept, uplink paused, resubscribing on reconnect");
                    }
                }
            }
            Err(error) => {
                *lock(&inner.last_error) = Some(format!("{server:?}: {error}"));
                attempt = attempt.saturating_add(1);
                index += 1;
                if attempt == 1 || attempt.is_multiple_of(20) {
                    tracing::warn!(server = ?server, %error, attempt, "cannot connect to NATS; retrying");
                }
            }
        }
        tokio::select! {
            () = inner.stop.cancelled() => break,
            () = tokio::time::sleep(backoff(attempt)) => {}
        }
    }
}

/// TCP connect, `INFO`, TLS when asked for (by a `tls://` address or the server's
/// `tls_required`), `CONNECT` + `PING`, `PONG`. Returns the stream and any bytes read past the
/// `PONG`.
async fn handshake(
    inner: &Inner,
    server: &ServerAddr,
) -> Result<(NatsStream, BytesMut), ConnError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tcp = TcpStream::connect((server.host.as_str(), server.port)).await?;
        tcp.set_nodelay(true)?;
        let mut buf = BytesMut::with_capacity(4096);
        let info = match read_op(inner, &mut tcp, &mut buf).await? {
            ServerOp::Info(info) => info,
            other => {
                return Err(ConnError::Handshake(format!(
                    "expected INFO, got {other:?}"
                )));
            }
        };
        let info: serde_json::Value =
            serde_json::from_slice(&info).map_err(|e| ConnError::Handshake(e.to_string()))?;
        inner.note_info(&info);
        let server_requires_tls = info
            .get("tls_required")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let use_tls = server.tls || server_requires_tls;
        let mut stream = if use_tls {
            let Some(config) = inner.options.tls.clone() else {
                return Err(ConnError::Tls(
                    "the server requires TLS; use a tls:// URL (and nats_tls_ca for a private CA)"
                        .into(),
                ));
            };
            let name = rustls::pki_types::ServerName::try_from(server.host.clone())
                .map_err(|e| ConnError::Tls(format!("server name {:?}: {e}", server.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| ConnError::Tls(e.to_string()))?;
            Either::Right(Box::new(tls))
        } else {
            Either::Left(tcp)
        };
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "tls_required": use_tls,
            "lang": "rust-devgate",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "echo": false,
            "headers": true,
            "no_responders": true,
            "name": inner.options.name,
        });
        match (&server.auth, &inner.options.user) {
            (Some(UrlAuth::Token(token)), _) => connect["auth_token"] = token.expose().into(),
            (Some(UrlAuth::User(user, pass)), _) | (None, Some((user, pass))) => {
                connect["user"] = user.as_str().into();
                connect["pass"] = pass.expose().into();
            }
            (None, None) => {}
        }
        let mut hello = BytesMut::new();
        wire::connect(&mut hello, &connect);
        wire::ping(&mut hello);
        stream.write_all(&hello).await?;
        stream.flush().await?;
        loop {
            match read_op(inner, &mut stream, &mut buf).await? {
                ServerOp::Pong => return Ok((stream, buf)),
                ServerOp::Err(e) => return Err(ConnError::Refused(e)),
                ServerOp::Ping => {
                    stream.write_all(b"PONG\r\n").await?;
                    stream.flush().await?;
                }
                ServerOp::Info(info) => inner.note_info_bytes(&info),
                ServerOp::Ok => {}
                ServerOp::Msg { .. } => {
                    return Err(ConnError::Handshake("MSG before subscribing".into()));
                }
            }
        }
    })
    .await
    .map_err(|_| ConnError::Timeout)?
}

async fn read_op<S: AsyncRead + Unpin>(
    inner: &Inner,
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<ServerOp, ConnError> {
    loop {
        if let Some(op) = wire::decode(buf, inner.max_body())? {
            return Ok(op);
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnError::Closed);
        }
    }
}

/// The connection to the server: plain, or TLS over it. Plain keeps tokio's lock-free split
/// halves; TLS needs `tokio::io::split`, whose halves share a lock.
type NatsStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// Runs one established connection until it fails (`Err`) or the link is closed (`Ok`).
async fn serve(
    inner: &Arc<Inner>,
    stream: NatsStream,
    leftover: BytesMut,
) -> Result<(), ConnError> {
    match stream {
        Either::Left(tcp) => {
            let (reader, writer) = tcp.into_split();
            serve_halves(inner, reader, writer, leftover).await
        }
        Either::Right(tls) => {
            let (reader, writer) = tokio::io::split(*tls);
            serve_halves(inner, reader, writer, leftover).await
        }
    }
}

async fn serve_halves<R, W>(
    inner: &Arc<Inner>,
    reader: R,
    writer: W,
    leftover: BytesMut,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::select! {
        () = inner.stop.cancelled() => Ok(()),
        r = read_loop(inner, reader, leftover) => r,
        r = write_loop(inner, writer) => r,
        r = keepalive(inner) => r,
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    inner: &Inner,
    mut reader: R,
    mut buf: BytesMut,
) -> Result<(), ConnError> {
    loop {
        // Read per message: an INFO after CONNECT may change max_payload (account limits).
        while let Some(op) = wire::decode(&mut buf, inner.max_body())? {
            inner.dispatch(op);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_CHUNK);
        }
        if reader.read_buf(&mut buf).await? == 0 {
            return Err(ConnError::Closed);
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(inner: &Inner, mut writer: W) -> Result<(), ConnError> {
    let mut spare = BytesMut::new();
    loop {
        let chunk = {
            let mut st = lock(&inner.state);
            if st.out.is_empty() {
                None
            } else {
                Some(std::mem::replace(&mut st.out, std::mem::take(&mut spare)))
            }
        };
        match chunk {
            None => {
                inner.wake_writer.notified().await;
                // Let the tasks that are ready right now (sessions answering, logging in,
                // publishing) add their bytes before this one write: under load one syscall
                // (and one wakeup of the server) carries many operations instead of one each;
                // when nothing else is ready this returns at once.
                tokio::task::yield_now().await;
            }
            Some(mut chunk) => {
                writer.write_all(&chunk).await?;
                // A no-op on plain TCP; TLS may hold the last record until flushed.
                writer.flush().await?;
                chunk.clear();
                if chunk.capacity() <= OUT_LIMIT {
                    spare = chunk;
                }
                inner.room.notify_waiters();
            }
        }
    }
}

async fn keepalive(inner: &Inner) -> Result<(), ConnError> {
    let mut tick = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tick.tick().await;
        {
            let mut st = lock(&inner.state);
            if let Some(oldest) = st.pongs.front() {
                let waited = oldest.sent.elapsed();
                if waited > PING_INTERVAL * 2 {
                    return Err(ConnError::Stale(waited));
                }
            }
            wire::ping(&mut st.out);
            st.pongs.push_back(PendingPong::new(None));
        }
        inner.wake_writer.notify_one();
    }
}

impl Inner {
    /// Takes `max_payload` from an `INFO`: the first one, and any later one. With account
    /// limits the server announces its own maximum first and the account's in the `INFO` that
    /// answers `CONNECT`; publishing past the smaller one makes the server close the whole
    /// connection, every device's traffic with it.
    fn note_info(&self, info: &serde_json::Value) {
        if let Some(max) = info.get("max_payload").and_then(serde_json::Value::as_u64) {
            let max = usize::try_from(max).map_or(MAX_PAYLOAD_CAP, |m| m.min(MAX_PAYLOAD_CAP));
            self.max_payload.store(max, Ordering::Relaxed);
        }
    }

    /// [`Inner::note_info`] of a raw `INFO` body; an unreadable one changes nothing.
    fn note_info_bytes(&self, info: &[u8]) {
        match serde_json::from_slice::<serde_json::Value>(info) {
            Ok(info) => self.note_info(&info),
            Err(error) => tracing::debug!(%error, "unreadable INFO from the NATS server ignored"),
        }
    }

    /// The most header + payload bytes a delivered message may announce.
    fn max_body(&self) -> usize {
        self.max_payload
            .load(Ordering::Relaxed)
            .saturating_add(MSG_SLACK)
    }

    /// Marks the connection up: the inbox and every live subscription are (re)subscribed
    /// before anything else is written, under the same lock `subscribe` takes, so none is
    /// missed or sent before the connection exists.
    fn on_connect(&self) {
        *lock(&self.last_error) = None;
        {
            let mut st = lock(&self.state);
            st.out.clear();
            st.pongs.clear();
            subscribe_marked(&mut st, &self.inbox_subject(), INBOX_SID);
            // The gateway's own subscriptions first, then the devices': over a lowered
            // `max_subs` the refused ones are then devices', whose sessions end (and whose
            // devices reconnect elsewhere), not the stats, sessions or announcement ones, which
            // no refusal ends and which would stay deaf until the next connection.
            let subs = lock(&self.subs);
            for own in [true, false] {
                for (sid, slot) in subs.iter() {
                    let is_own = subjects::device_in(&slot.subject, "down").is_none();
                    if is_own == own && !slot.lock().draining {
                        subscribe_marked(&mut st, &slot.subject, *sid);
                    }
                }
            }
            st.connected = true;
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        self.connected.send_replace(true);
        self.metrics.nats_connected.set(1);
        self.wake_writer.notify_one();
    }

    /// Marks the connection down: unsent bytes are dropped with the socket, `PING` waiters
    /// and requests fail, publishers waiting for room are released (to fail).
    fn on_disconnect(&self) {
        let was_connected = {
            let mut st = lock(&self.state);
            let was = st.connected;
            st.connected = false;
            st.out = BytesMut::new();
            st.pongs.clear();
            was
        };
        lock(&self.requests).clear();
        self.room.notify_waiters();
        if was_connected {
            self.connected.send_replace(false);
            self.metrics.nats_connected.set(0);
            self.metrics.nats_disconnects.inc();
        }
    }

    fn dispatch(&self, op: ServerOp) {
        match op {
            ServerOp::Msg { sid, msg } if sid == INBOX_SID => {
                let token = msg
                    .subject
                    .strip_prefix(self.inbox.as_bytes())
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse::<u64>().ok());
                if let Some(waiter) = token.and_then(|t| lock(&self.requests).remove(&t)) {
                    let _ = waiter.send(msg.detach());
                }
            }
            ServerOp::Msg { sid, msg } => {
                // Copied out of the read block before the table's lock is taken: a queued
                // message must not pin the block (see `Msg::detach`).
                let msg = msg.detach();
                // Pushed under the table's lock (the order everywhere is table, then slot)
                // rather than cloning the slot's `Arc` out: with thousands of sessions each
                // message touches a cold slot, and the reference count round trip was two
                // cache-missing atomic operations per message. The wake comes after both
                // locks are released.
                let pushed = lock(&self.subs).get(&sid).map(|slot| slot.push(msg));
                match pushed {
                    Some(Ok(Some(waker))) => waker.wake(),
                    Some(Ok(None)) => {}
                    None => self.unsubscribe_stray(sid),
                    Some(Err(SlotFull)) => {
                        self.metrics.nats_slow_consumers.inc();
                        tracing::warn!(sid, "subscription queue full; message dropped");
                    }
                }
            }
            ServerOp::Ping => {
                wire::pong(&mut lock(&self.state).out);
                self.wake_writer.notify_one();
            }
            ServerOp::Pong => {
                let answered = lock(&self.state).pongs.pop_front();
                if let Some(tx) = answered.and_then(|p| p.waiter) {
                    let _ = tx.send(());
                }
            }
            // Before the inbox case: a request whose reply subject is refused names the inbox too.
            ServerOp::Err(error) if is_publish_refusal(&error) => {
                if refusal_may_be_uplink(&error) {
                    let refused = self.refused.fetch_add(1, Ordering::AcqRel) + 1;
                    tracing::warn!(%error, refused_total = refused, "NATS refused a publish; uplink confirmations in flight fail and devices resend");
                } else {
                    tracing::warn!(%error, "NATS refused a publish that is not uplink (a reply to a request received before a reconnect, to a reused reply subject or after 2 minutes, or a claim); uplink confirmations are unaffected");
                }
            }
            // A NATS user without `devgate.inbox.>` (a config from before this prefix): the
            // server refuses the inbox subscription, every claim waits out its timeout and
            // reclaims never settle. Say so plainly instead of a generic warning.
            ServerOp::Err(error) if error.contains(self.inbox.as_str()) => tracing::error!(
                %error,
                inbox = %self.inbox,
                "NATS refused this gateway's reply inbox: every login waits claim_timeout_ms and split sessions are not healed; allow the gateway user to subscribe to devgate.inbox.> (nats/accounts.conf)"
            ),
            // After the inbox case. The server keeps the connection but registers no interest:
            // a device welcomed on it would be unreachable ("no responders" to services, and a
            // login elsewhere would not find it). Its subscription ends, and so does the login
            // or session (`unavailable`); the device reconnects, perhaps to a gateway allowed.
            ServerOp::Err(error) if is_subscription_refusal(&error) => {
                let ended = refused_subject(&error)
                    .map_or(0, |subject| self.end_refused(subject, refused_sid(&error)));
                self.metrics.nats_subscriptions_refused.inc();
                tracing::error!(%error, ended, "NATS refused a subscription: a device's ends with its session, the gateway's own (stats, sessions, announcements) are sent again after the next reconnect; allow the gateway user to subscribe to the subject named (nats/accounts.conf)");
            }
            // Names no subject: the `PING` marked after each `SUB` tells which one it was.
            ServerOp::Err(error) if is_subscription_limit(&error) => self.end_over_limit(&error),
            ServerOp::Err(error) => tracing::warn!(%error, "NATS server error"),
            ServerOp::Info(info) => self.note_info_bytes(&info),
            ServerOp::Ok => {}
        }
    }

    /// What the reply inbox subscribes to: every reply to this link's requests.
    fn inbox_subject(&self) -> String {
        format!("{}*", self.inbox)
    }

    /// Handles a `SUB` refused for the connection's subscription limit (`max_subs`, of the
    /// server, the account or the user). Like a permissions refusal, a device's subscription
    /// ends, and with it its login or session: welcomed, nothing would reach it. The gateway's
    /// own subscriptions are sent again on the next connection.
    ///
    /// One case is misattributed: when a server re-authorises a connection already at its
    /// limit (a config reload, an account update), it sends this error unprompted and closes
    /// the connection 20 ms later. A `SUB` in flight then may be blamed and its login refused
    /// `unavailable` (the device retries) although the server took it; every other session
    /// is resubscribed on the next connection. Keeping `max_subs` above the gateway's need
    /// avoids both.
    fn end_over_limit(&self, error: &str) {
        let sid = lock(&self.state).pongs.front().and_then(|p| p.after_sub);
        let subject: Option<Box<str>> = match sid {
            Some(INBOX_SID) => Some(self.inbox_subject().into()),
            Some(sid) => lock(&self.subs).get(&sid).map(|slot| slot.subject.clone()),
            None => None,
        };
        let ended = match (&subject, sid) {
            (Some(subject), Some(sid)) => self.end_refused(subject, Some(sid)),
            _ => 0,
        };
        self.metrics.nats_subscriptions_refused.inc();
        tracing::error!(
            %error,
            subject = subject.as_deref().unwrap_or("(unknown)"),
            ended,
            "NATS refused a subscription over max_subs: a device's ends its login or session (the device may reconnect to another gateway), the gateway's own stay deaf until the next connection; keep max_subs above the devices per gateway plus 4"
        );
    }

    /// Ends the device subscriptions to `subject` the server refused (only `sid` when the
    /// refusal names one: a config reload revoking a live subscription does); returns how many.
    /// Only a device's downlink ends: its session then ends too, and the device reconnects,
    /// perhaps to a gateway that may subscribe. The gateway's own subscriptions (stats,
    /// sessions, its inbox) stay in the table, so the next connection, perhaps under fixed
    /// permissions, subscribes them again.
    fn end_refused(&self, subject: &str, sid: Option<u64>) -> usize {
        if subjects::device_in(subject, "down").is_none() {
            return 0;
        }
        let ended: Vec<Arc<Slot>> = {
            let mut subs = lock(&self.subs);
            let sids: Vec<u64> = subs
                .iter()
                .filter(|(s, slot)| &*slot.subject == subject && sid.is_none_or(|sid| sid == **s))
                .map(|(sid, _)| *sid)
                .collect();
            sids.iter().filter_map(|sid| subs.remove(sid)).collect()
        };
        for slot in &ended {
            slot.close();
        }
        ended.len()
    }

    /// A message for a sid this link no longer has: the server still routes its subject here.
    /// Mostly harmless (messages in flight when the `UNSUB` went out), but if an `UNSUB` was
    /// ever lost the interest would live on the server forever, hiding "no responders" from
    /// services and routing a device's downlink into the void; a repeated `UNSUB` (a few bytes
    /// per such message, and never past [`OUT_LIMIT`]) ends it either way.
    fn unsubscribe_stray(&self, sid: u64) {
        let sent = {
            let mut st = lock(&self.state);
            let room = st.connected && st.out.len() < OUT_LIMIT;
            if room {
                wire::unsubscribe(&mut st.out, sid);
            }
            room
        };
        if sent {
            self.wake_writer.notify_one();
        }
        let strays = self.strays.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(
            sid,
            unsub_sent = sent,
            strays_total = strays,
            "message for an unknown subscription dropped"
        );
    }
}

/// Whether a refused publish could be an uplink message, whose refusal must spoil the
/// confirmations in flight (the `-ERR` does not say which message it was). Uplink goes to
/// `device.<id>.up` without a reply subject, so a refusal naming another subject, or a reply
/// subject (`... for Publish with Reply of ...`), cannot be one. Replies are the common case:
/// `allow_responses` admits one reply per request received on the same connection within 2
/// minutes, so replies after a reconnect are refused; they must not make every device on the
/// gateway resend its uplink. An unreadable refusal counts, to be safe.
fn refusal_may_be_uplink(error: &str) -> bool {
    const REPLY: &str = "permissions violation for publish with reply of ";
    if error.to_ascii_lowercase().starts_with(REPLY) {
        return false;
    }
    match refused_subject(error) {
        Some(subject) => subjects::device_in(subject, "up").is_some(),
        None => true,
    }
}

/// The subject a permissions `-ERR` names (`... Publish to "<subject>"`, `... Subscription to
/// "<subject>"`), if it reads as one.
fn refused_subject(error: &str) -> Option<&str> {
    let lower = error.to_ascii_lowercase();
    let at = ["for publish to ", "for subscription to "]
        .iter()
        .find_map(|p| lower.find(p).map(|i| i + p.len()))?;
    quoted(error.get(at..)?.trim_start())
}

/// The sid a refusal names: a config reload that revokes a live subscription reports
/// `... Subscription to "<subject>" (sid "<sid>")`; a refused `SUB` names none.
fn refused_sid(error: &str) -> Option<u64> {
    const SID: &str = "(sid ";
    let at = error.find(SID)? + SID.len();
    quoted(error.get(at..)?)?.parse().ok()
}

/// The text between a leading `"` and the next one.
fn quoted(text: &str) -> Option<&str> {
    let rest = text.strip_prefix('"')?;
    rest.get(..rest.find('"')?)
}

/// Whether a `-ERR` reports a refused subscription (`Permissions Violation for Subscription to
/// ...`); the server keeps the connection open after it.
fn is_subscription_refusal(error: &str) -> bool {
    const PREFIX: &str = "Permissions Violation for Subscription";
    error
        .get(..PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// Whether a `-ERR` reports a `SUB` refused for the subscription limit (`maximum
/// subscriptions exceeded`); the server keeps the connection open after it.
fn is_subscription_limit(error: &str) -> bool {
    error
        .to_ascii_lowercase()
        .contains("maximum subscriptions exceeded")
}

/// Whether a `-ERR` reports a dropped publish (`Permissions Violation for Publish to ...` or
/// `... for Publish with Reply of ...`); the server keeps the connection open after it.
fn is_publish_refusal(error: &str) -> bool {
    const PREFIX: &str = "Permissions Violation for Publish";
    error
        .get(..PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::FutureExt;

    /// A link that is never started: tests drive its state machine by hand.
    fn idle_link() -> Link {
        let options = LinkOptions {
            servers: parse_servers("nats://127.0.0.1:1").expect("address"),
            name: "unit".into(),
            user: None,
            tls: None,
        };
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        Link {
            inner: Inner::new(options, metrics),
        }
    }

    /// Takes what the writer would send next.
    fn written(link: &Link) -> String {
        let out = std::mem::take(&mut lock(&link.inner.state).out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn msg_for(sid: u64, subject: &'static str) -> ServerOp {
        let msg = Msg::new(
            Bytes::from_static(subject.as_bytes()),
            None,
            None,
            Bytes::new(),
        );
        ServerOp::Msg { sid, msg }
    }

    #[tokio::test]
    async fn a_drain_overlapping_a_reconnect_is_not_subscribed_again() {
        let link = idle_link();
        link.inner.on_connect();
        let mut sub = link.subscribe("device.x.down");
        written(&link);
        let sid = sub.sid;
        let drain = sub.drain(Duration::from_secs(5));
        tokio::pin!(drain);
        assert!(
            drain.as_mut().now_or_never().is_none(),
            "waits for its PONG"
        );
        assert_eq!(written(&link), format!("UNSUB {sid}\r\nPING\r\n"));

        // The connection drops before the PONG and comes back at once.
        link.inner.on_disconnect();
        link.inner.on_connect();
        let resent = written(&link);
        assert!(resent.starts_with("SUB devgate.inbox."), "{resent}");
        assert!(
            !resent.contains(&format!(" {sid}\r\n")),
            "the draining sid was subscribed again: {resent}"
        );
        assert_eq!(drain.await, Err(LinkError::NotConnected), "unconfirmed");
        assert!(!lock(&link.inner.subs).contains_key(&sid));
    }

    #[tokio::test]
    async fn unsubscribe_removes_the_sid_where_it_writes_unsub() {
        let link = idle_link();
        link.inner.on_connect();
        let mut kept = link.subscribe("device.kept.down");
        let mut gone = link.subscribe("device.gone.down");
        written(&link);
        gone.unsubscribe();
        assert_eq!(written(&link), format!("UNSUB {}\r\n", gone.sid));
        assert!(!lock(&link.inner.subs).contains_key(&gone.sid));
        link.inner.on_disconnect();
        link.inner.on_connect();
        let resent = written(&link);
        assert!(resent.contains(&format!("SUB device.kept.down {}\r\n", kept.sid)));
        assert!(!resent.contains("device.gone.down"), "{resent}");

        // Unsubscribing while down leaves nothing to resubscribe either.
        link.inner.on_disconnect();
        kept.unsubscribe();
        link.inner.on_connect();
        assert!(!written(&link).contains("device.kept.down"));
        // A drain while down also forgets at once.
        link.inner.on_disconnect();
        let mut late = link.subscribe("device.late.down");
        assert_eq!(
            late.drain(Duration::from_secs(1)).await,
            Err(LinkError::NotConnected)
        );
        link.inner.on_connect();
        assert!(!written(&link).contains("device.late.down"));
    }

    #[test]
    fn a_message_for_an_unknown_sid_is_unsubscribed_again() {
        let link = idle_link();
        link.inner.on_connect();
        let mut sub = link.subscribe("device.live.down");
        written(&link);
        link.inner.dispatch(msg_for(99, "device.old.down"));
        assert_eq!(written(&link), "UNSUB 99\r\n");
        assert_eq!(link.inner.strays.load(Ordering::Relaxed), 1);

        // Known sids and the inbox (whose late replies are normal) are not unsubscribed.
        link.inner.dispatch(msg_for(sub.sid, "device.live.down"));
        link.inner.dispatch(msg_for(INBOX_SID, "devgate.inbox.x.1"));
        assert_eq!(written(&link), "");
        assert!(sub.try_next().is_some());

        // Never past OUT_LIMIT.
        lock(&link.inner.state).out = BytesMut::from(&vec![b' '; OUT_LIMIT][..]);
        link.inner.dispatch(msg_for(99, "device.old.down"));
        assert_eq!(lock(&link.inner.state).out.len(), OUT_LIMIT);
        assert_eq!(
            link.inner.strays.load(Ordering::Relaxed),
            2,
            "counted anyway"
        );
    }

    #[test]
    fn a_queued_message_does_not_pin_the_read_buffer() {
        let link = idle_link();
        link.inner.on_connect();
        let mut sub = link.subscribe("device.a.down");
        let mut block = BytesMut::with_capacity(READ_CHUNK);
        let sid = sub.sid;
        block.extend_from_slice(
            format!("MSG device.a.down {sid} _INBOX.reply.1 5\r\nhello\r\n").as_bytes(),
        );
        let range = block.as_ptr() as usize..block.as_ptr() as usize + block.capacity();
        let op = wire::decode(&mut block, link.inner.max_body())
            .expect("valid")
            .expect("complete");
        link.inner.dispatch(op);
        drop(block);
        let msg = sub.try_next().expect("queued");
        let reply = msg.reply.clone().expect("reply");
        for part in [&msg.subject, &reply, &msg.payload] {
            assert!(
                !range.contains(&(part.as_ptr() as usize)),
                "{part:?} points into the read block"
            );
        }
        assert_eq!(
            (&reply[..], &msg.payload[..]),
            (&b"_INBOX.reply.1"[..], &b"hello"[..])
        );
    }

    #[tokio::test]
    async fn a_panic_in_the_run_task_still_marks_the_link_down() {
        let link = idle_link();
        let mut sub = link.subscribe("device.p.down");
        let inner = link.inner.clone();
        let task = tokio::spawn(async move {
            let _teardown = Teardown(&inner);
            inner.on_connect();
            panic!("a bug in the connection task");
        });
        assert!(task.await.is_err(), "the task panicked");
        assert!(!link.is_connected());
        assert!(!*link.connected_watch().borrow());
        assert_eq!(
            link.publish_now("x", None, Headers::None, b""),
            Err(LinkError::Closed)
        );
        assert!(sub.next().await.is_none(), "subscriptions end");
    }

    #[test]
    fn a_publish_refusal_moves_the_confirm_epoch() {
        let link = idle_link();
        link.inner.on_connect();
        let before = (link.confirm_epoch(), link.epoch());
        link.inner.dispatch(ServerOp::Err(
            "Permissions Violation for Subscription to \"x\"".into(),
        ));
        assert_eq!(link.confirm_epoch(), before.0, "not a publish");
        link.inner.dispatch(ServerOp::Err(
            "Permissions Violation for Publish to \"device.bad.up\"".into(),
        ));
        assert_ne!(link.confirm_epoch(), before.0);
        assert_eq!(
            link.epoch(),
            before.1,
            "the connection epoch is for reconnects"
        );
    }

    #[test]
    fn a_refused_reply_or_claim_does_not_spoil_uplink_confirmations() {
        let link = idle_link();
        link.inner.on_connect();
        let before = link.confirm_epoch();
        for not_uplink in [
            // A reply to a request received before a reconnect (allow_responses).
            "Permissions Violation for Publish to \"_INBOX.svc.1\"",
            "permissions violation for publish to \"reply.custom\"",
            "Permissions Violation for Publish to \"device.a.down\"",
            "Permissions Violation for Publish to \"device.a.up.more\"",
            "Permissions Violation for Publish with Reply of \"devgate.inbox.x.1\"",
        ] {
            link.inner.dispatch(ServerOp::Err(not_uplink.into()));
            assert_eq!(link.confirm_epoch(), before, "{not_uplink}");
        }
        // Uplink, or a refusal whose subject cannot be read: confirmations in flight fail.
        for (i, maybe_uplink) in [
            "Permissions Violation for Publish to \"device.a.up\"",
            "Permissions Violation for Publish to device.a.up",
            "Permissions Violation for Publish",
        ]
        .into_iter()
        .enumerate()
        {
            link.inner.dispatch(ServerOp::Err(maybe_uplink.into()));
            assert_eq!(
                link.confirm_epoch(),
                before + 1 + i as u64,
                "{maybe_uplink}"
            );
        }
    }

    #[test]
    fn max_payload_follows_the_info_that_answers_connect() {
        let link = idle_link();
        link.inner.on_connect();
        let payload = vec![0u8; 2000];
        link.publish_now("device.a.up", None, Headers::None, &payload)
            .expect("within the default 1 MiB");
        // With account limits, the INFO after CONNECT carries the account's max_payload.
        link.inner.dispatch(ServerOp::Info(Bytes::from_static(
            b"{\"max_payload\":1000,\"connect_info\":true}",
        )));
        assert!(matches!(
            link.publish_now("device.a.up", None, Headers::None, &payload),
            Err(LinkError::TooLarge {
                len: 2000,
                max: 1000
            })
        ));
        // An INFO without it (cluster updates) or unreadable changes nothing.
        for info in [&b"{\"connect_urls\":[\"a:4222\"]}"[..], b"{not json"] {
            link.inner
                .dispatch(ServerOp::Info(Bytes::copy_from_slice(info)));
            assert!(
                link.publish_now("device.a.up", None, Headers::None, &payload)
                    .is_err()
            );
        }
    }

    #[test]
    fn ipv6_servers_need_brackets_and_take_the_default_port() {
        let hosts = |list: &str| -> Vec<(String, u16)> {
            parse_servers(list)
                .expect("valid")
                .into_iter()
                .map(|s| (s.host, s.port))
                .collect()
        };
        assert_eq!(
            hosts("nats://[::1], tls://[fd00::7]:4333, nats://a:1, b, u:p@[::2]"),
            vec![
                ("::1".to_owned(), 4222),
                ("fd00::7".to_owned(), 4333),
                ("a".to_owned(), 1),
                ("b".to_owned(), 4222),
                ("::2".to_owned(), 4222),
            ]
        );
        for (bad, why) in [
            ("nats://::1", "brackets"),
            ("nats://[::1", "closing ]"),
            ("nats://[::1]4222", ":port"),
            ("nats://a:x", "not a number"),
        ] {
            let err = parse_servers(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_subscription_queue_is_bounded_in_bytes_too() {
        let link = idle_link();
        link.inner.on_connect();
        let mut sub = link.subscribe("device.x.down");
        let mib = |sid: u64| ServerOp::Msg {
            sid,
            msg: Msg::new(
                Bytes::from_static(b"device.x.down"),
                None,
                None,
                Bytes::from(vec![7u8; 1024 * 1024]),
            ),
        };
        // 16 messages of 1 MiB (plus their subjects) are more than SLOT_BYTES_LIMIT: the last
        // is dropped, though far fewer than SLOT_LIMIT messages wait.
        for _ in 0..16 {
            link.inner.dispatch(mib(sub.sid));
        }
        let mut queued = 0;
        while sub.try_next().is_some() {
            queued += 1;
        }
        assert_eq!(queued, 15);
        // Taken out, their bytes are free again.
        for _ in 0..15 {
            link.inner.dispatch(mib(sub.sid));
        }
        assert_eq!(std::iter::from_fn(|| sub.try_next()).count(), 15);
    }

    #[test]
    fn a_refused_device_subscription_ends_and_the_gateways_own_are_kept() {
        let link = idle_link();
        link.inner.on_connect();
        let mut device = link.subscribe("device.a.down");
        let stats = link.subscribe("devgate.gateways.stats");
        for subject in ["device.a.down", "devgate.gateways.stats"] {
            link.inner.dispatch(ServerOp::Err(format!(
                "Permissions Violation for Subscription to \"{subject}\""
            )));
        }
        assert!(device.is_ended());
        assert!(device.try_next().is_none());
        assert!(!stats.is_ended(), "the gateway's own subscription is kept");
        // ...and subscribed again by the next connection, perhaps under fixed permissions.
        link.inner.on_disconnect();
        written(&link);
        link.inner.on_connect();
        let out = written(&link);
        assert!(
            out.contains(&format!("SUB devgate.gateways.stats {}", stats.sid)),
            "{out}"
        );
        assert!(!out.contains("device.a.down"), "{out}");
    }

    #[test]
    fn a_reload_revoking_one_live_subscription_ends_that_one() {
        let link = idle_link();
        link.inner.on_connect();
        // Two sessions of one device on this gateway for a moment (a local takeover).
        let old = link.subscribe("device.a.down");
        let new = link.subscribe("device.a.down");
        link.inner.dispatch(ServerOp::Err(format!(
            "Permissions Violation for Subscription to \"device.a.down\" (sid \"{}\")",
            old.sid
        )));
        assert!(old.is_ended());
        assert!(!new.is_ended());
    }

    #[test]
    fn an_empty_subscription_queue_takes_a_message_beyond_the_byte_limit() {
        let link = idle_link();
        link.inner.on_connect();
        let mut sub = link.subscribe("device.x.down");
        let huge = |sid: u64| ServerOp::Msg {
            sid,
            msg: Msg::new(
                Bytes::from_static(b"device.x.down"),
                None,
                None,
                Bytes::from(vec![1u8; SLOT_BYTES_LIMIT + 1]),
            ),
        };
        link.inner.dispatch(huge(sub.sid));
        link.inner.dispatch(huge(sub.sid));
        assert!(
            sub.try_next().is_some(),
            "the session gets it and answers it"
        );
        assert!(
            sub.try_next().is_none(),
            "a second one behind it is dropped"
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff(0), Duration::ZERO);
        for attempt in [1, 5, 19, 20, 1000] {
            let full = (BACKOFF_STEP * attempt).min(MAX_BACKOFF);
            let got: Vec<_> = (0..50).map(|_| backoff(attempt)).collect();
            assert!(
                got.iter().all(|b| *b >= full.mul_f64(0.75) && *b <= full),
                "{attempt}: {got:?}"
            );
            assert!(got.iter().any(|b| *b != got[0]), "jittered: {got:?}");
        }
    }

    #[test]
    fn a_lone_userinfo_is_a_token() {
        let servers = parse_servers("nats://s3cr3t@a, nats://u:p@b, nats://u:@c").expect("valid");
        let auth: Vec<_> = servers.iter().map(|s| s.auth.clone()).collect();
        assert!(matches!(&auth[0], Some(UrlAuth::Token(t)) if t.expose() == "s3cr3t"));
        assert!(matches!(&auth[1], Some(UrlAuth::User(u, p)) if u == "u" && p.expose() == "p"));
        assert!(matches!(&auth[2], Some(UrlAuth::User(u, p)) if u == "u" && p.expose().is_empty()));
    }
}
