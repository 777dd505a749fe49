//! One device connection from accept to close.
//!
//! The life of a session: optional PROXY header, `HELLO` (deadline, id rules, token), login
//! (take the device over from any older session, here or on another gateway), `WELCOME`, then
//! one task multiplexing the device socket, the device's NATS subscription, local commands and
//! timers. One task and no per-session channels beyond the subscription keep an idle session
//! small.
//!
//! ## Takeover without duplicates
//! The newest login wins. An older holder that must yield first *drains* its subscription
//! (NATS confirms nothing more will be routed to it), writes what it already received to its
//! device, sends `GOAWAY replaced`, and only then answers "released". The new session
//! subscribes after that and re-checks for competitors before `WELCOME`, so no message reaches
//! two sessions and none reaches the old one after the new one is welcomed. Two simultaneous
//! logins on different gateways both subscribe, see each other's claim, and agree on the
//! winner by comparing [`ClaimKey`]s; the loser hands messages it received meanwhile back to
//! NATS, where they reach the winner.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::auth::Verdict;
use crate::bus::{Headers, LinkError, Msg, RequestError, Subscription};
use crate::codec::{ErrorBody, ErrorCode, Frame, GoAway, GoAwayReason, Hello, HelloLogin, Welcome};
use crate::common::{unix_ms, unix_ns};
use crate::conn::{Conn, DeviceStream};
use crate::contract::{
    ClaimKey, ClaimReply, ClaimRequest, DeliveryReply, DeliveryStatus, DeviceId, KickReply,
    PresenceEvent, PresenceEventKind, PresenceInfo, SessionSummary, headers, subjects,
    subjects::ControlOp,
};
use crate::metrics::{Downlink, Uplink};
use crate::proxy_protocol;
use crate::registry::{CommandReceiver, Entry, SessionCommand};
use crate::server::{HandshakeSlot, Shared};

/// How long last words (GOAWAY/ERROR and what precedes them) may take to write.
const LAST_WORDS: Duration = Duration::from_secs(2);
/// Claim rounds before a login gives up on an unstable device (flapping between gateways).
pub(crate) const MAX_CLAIM_ROUNDS: usize = 8;

/// Why a connection is refused before or during login: becomes an `ERROR` frame.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    fn frame(&self) -> Frame {
        Frame::json(
            Frame::Error,
            &ErrorBody {
                code: self.code,
                message: self.message.clone(),
            },
        )
    }
}

/// How a welcomed session ended; the presence event's reason.
#[derive(Debug)]
enum End {
    /// The device closed the connection.
    Closed,
    /// The socket failed.
    Io(String),
    /// The gateway closed with an ERROR frame.
    Error(Refusal),
    /// The gateway closed with a GOAWAY frame.
    GoAway(GoAwayReason),
    /// Hard stop at the end of the drain window.
    Shutdown,
}

impl End {
    fn reason(&self) -> String {
        match self {
            End::Closed => "closed".into(),
            End::Io(_) => "io_error".into(),
            End::Error(r) => r.code.as_str().into(),
            End::GoAway(r) => r.as_str().into(),
            End::Shutdown => "shutdown".into(),
        }
    }
}

/// Serves one accepted connection until it closes.
/// `slot` is this connection's place among the handshakes in progress: given back once HELLO
/// is checked (or the connection refused), so live sessions never count against it.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
) {
    // Each phase runs in its own allocation, freed when the phase ends: the task itself holds
    // only a pointer, and an idle session pays only for the state of its steady phase.
    let Some(greeted) = Box::pin(greet(&shared, stream, peer, slot)).await else {
        return;
    };
    let Some((session, early)) = Box::pin(welcome(shared, greeted)).await else {
        return;
    };
    Box::pin(live(session, early)).await;
}

/// A connection whose HELLO passed every check: what the login goes on with.
struct Greeted {
    conn: Conn,
    id: DeviceId,
    hello: Hello,
    /// The device's address (from the PROXY header when there is one).
    remote: SocketAddr,
    /// How its token was accepted: counted once the login is welcomed, so a rotation's
    /// counter measures devices that got in, not attempts.
    verdict: Verdict,
}

/// PROXY header and `HELLO`: returns the checked login, or `None` once the connection was
/// refused or closed.
async fn greet(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
) -> Option<Greeted> {
    let greeted = greet_in_slot(shared, stream, peer).await;
    drop(slot);
    greeted
}

/// [`greet`], while holding a handshake slot.
async fn greet_in_slot(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<Greeted> {
    let _ = stream.set_nodelay(true);
    let hello_deadline = Instant::now() + Duration::from_millis(shared.config.hello_timeout_ms);
    let mut leftover = BytesMut::new();
    let mut remote = peer;
    let mut refusal = None;
    if shared.config.proxy_protocol
        && !proxy_protocol::trusted(&shared.config.proxy_trusted_cidrs, peer.ip())
    {
        shared.metrics.proxy_untrusted.inc();
        refusal = Some(Refusal::new(
            ErrorCode::ProtocolViolation,
            format!(
                "{} may not send a PROXY header: not in the gateway's proxy_trusted_cidrs; \
                 connect through the load balancer",
                peer.ip()
            ),
        ));
    } else if shared.config.proxy_protocol {
        match tokio::time::timeout_at(
            hello_deadline,
            proxy_protocol::read_header(&mut stream, &mut leftover),
        )
        .await
        {
            Ok(Ok(source)) => remote = source.unwrap_or(peer),
            Ok(Err(e)) => refusal = Some(Refusal::new(ErrorCode::ProtocolViolation, e.to_string())),
            Err(_) => {
                refusal = Some(Refusal::new(
                    ErrorCode::HelloTimeout,
                    "no PROXY header before the deadline",
                ))
            }
        }
    }
    let stream = match &shared.device_tls {
        None => DeviceStream::plain(stream),
        Some(tls) => {
            let mut deadline = hello_deadline;
            if let Some(r) = &refusal {
                // A refused PROXY phase is answered inside TLS only when the peer's bytes
                // read so far are a ClientHello (a device dialling a gateway directly from a
                // trusted address, its missing header refused), and only briefly: a refused
                // peer must not hold a handshake slot for the HELLO timeout. A peer outside
                // `proxy_trusted_cidrs` is never read from, so it is closed without a word.
                if leftover.first() != Some(&TLS_HANDSHAKE_RECORD) {
                    refuse_unheard(shared, remote, r);
                    return None;
                }
                deadline = deadline.min(Instant::now() + LAST_WORDS);
            }
            let counted = refusal.is_none();
            match accept_tls(
                shared,
                stream,
                tls,
                &mut leftover,
                deadline,
                remote,
                counted,
            )
            .await
            {
                Some(stream) => stream,
                None => {
                    if let Some(r) = &refusal {
                        refuse_unheard(shared, remote, r);
                    }
                    return None;
                }
            }
        }
    };
    if let Some(r) = refusal {
        let mut conn = Conn::new(stream, shared.codec, BytesMut::new());
        refuse(shared, &mut conn, remote, None, r).await;
        return None;
    }
    let hello = tokio::select! {
        h = handshake(shared, &stream, &mut leftover, hello_deadline) => h,
        () = shared.draining.cancelled() => {
            let mut conn = Conn::new(stream, shared.codec, BytesMut::new());
            goodbye(shared, &mut conn, GoAwayReason::Draining).await;
            return None;
        }
    };
    // From here on frames may be up to `max_frame_len`; what the device pipelined after its
    // HELLO is already in `leftover`.
    let mut conn = Conn::new(stream, shared.codec, leftover);
    match hello {
        Ok((id, hello, verdict)) => Some(Greeted {
            conn,
            id,
            hello,
            remote,
            verdict,
        }),
        Err(None) => None, // closed before HELLO
        Err(Some(r)) => {
            refuse(shared, &mut conn, remote, None, r).await;
            None
        }
    }
}

/// The first byte of a TLS handshake record (a ClientHello starts with it).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Counts and logs a refusal that cannot be told to the peer (no TLS session to say it in),
/// then the connection is closed by dropping it.
fn refuse_unheard(shared: &Shared, remote: SocketAddr, refusal: &Refusal) {
    shared.metrics.error(refusal.code);
    if let Some(suppressed) = shared.refusal_logs.admit(unix_ms() / 1000) {
        tracing::info!(
            remote = %remote,
            code = refusal.code.as_str(),
            message = %refusal.message,
            suppressed,
            "refusing device connection before TLS (closed without an ERROR)"
        );
    }
}

/// The TLS handshake of a device connection, by `deadline`; `None` when it failed (closed:
/// before TLS there is no way to tell the device why in a frame; rustls sent it an alert).
/// A failure is counted and logged when `counted`; a connection already refused in its PROXY
/// phase is counted once, as that refusal, whose brief handshake only serves to tell why.
async fn accept_tls(
    shared: &Shared,
    tcp: TcpStream,
    tls: &crate::device_tls::DeviceTls,
    leftover: &mut BytesMut,
    deadline: Instant,
    remote: SocketAddr,
    counted: bool,
) -> Option<DeviceStream> {
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(deadline, crate::device_tls::accept(&tcp, tls.config(), leftover)) => r,
        () = shared.draining.cancelled() => return None,
    };
    let error = match accepted {
        Ok(Ok(server)) => return Some(DeviceStream::tls(tcp, server)),
        // A health check connects and closes; plaintext devices' silent closes are not
        // counted either.
        Ok(Err(crate::device_tls::HandshakeError::Silent)) => return None,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no TLS handshake before the HELLO deadline".to_owned(),
    };
    if !counted {
        return None;
    }
    shared.metrics.tls_handshake_failures.inc();
    if let Some(suppressed) = shared.refusal_logs.admit(unix_ms() / 1000) {
        tracing::info!(
            remote = %remote,
            %error,
            suppressed,
            "device TLS handshake failed"
        );
    }
    None
}

/// Reads the first frame with the HELLO limit (`max_hello_len`), into `buf`, which keeps any
/// bytes after it.
async fn read_first_frame(
    shared: &Shared,
    stream: &DeviceStream,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, crate::codec::CodecError> {
    use tokio_util::codec::Decoder;
    let mut codec = crate::codec::FrameCodec::new(shared.config.hello_limit());
    loop {
        if let Some(frame) = codec.decode(buf)? {
            return Ok(Some(frame));
        }
        if std::future::poll_fn(|cx| stream.poll_read_buf(buf, cx)).await? == 0 {
            return Ok(None);
        }
    }
}

/// Sends an ERROR frame, counts it, and closes.
async fn refuse(
    shared: &Shared,
    conn: &mut Conn,
    remote: SocketAddr,
    device: Option<&DeviceId>,
    refusal: Refusal,
) {
    shared.metrics.error(refusal.code);
    if let Some(suppressed) = shared.refusal_logs.admit(unix_ms() / 1000) {
        tracing::info!(
            remote = %remote,
            device_id = device.map(DeviceId::as_str),
            code = refusal.code.as_str(),
            message = %refusal.message,
            suppressed,
            "refusing device connection"
        );
    }
    let frame = refusal.frame();
    shared.metrics.frame_out(frame.kind(), frame.wire_len());
    conn.close_with(Some(frame), LAST_WORDS).await;
}

/// Longest part of a refused id quoted back in an ERROR: enough to recognise it, while the
/// ERROR stays far inside any frame limit however the id is escaped.
const QUOTED_ID_CHARS: usize = 64;

/// `s` quoted for an error message, cut after [`QUOTED_ID_CHARS`] characters.
fn quoted_prefix(s: &str) -> String {
    match s.char_indices().nth(QUOTED_ID_CHARS) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
        None => format!("{s:?}"),
    }
}

/// Sends GOAWAY and closes.
async fn goodbye(shared: &Shared, conn: &mut Conn, reason: GoAwayReason) {
    let frame = goaway_frame(shared, reason);
    shared.metrics.frame_out(frame.kind(), frame.wire_len());
    conn.close_with(Some(frame), LAST_WORDS).await;
}

fn goaway_frame(shared: &Shared, reason: GoAwayReason) -> Frame {
    let reconnect_after_ms = match reason {
        GoAwayReason::Draining | GoAwayReason::Rebalance => {
            rand::random_range(0..=shared.config.drain_reconnect_jitter_ms)
        }
        GoAwayReason::Replaced | GoAwayReason::Kicked => 0,
    };
    Frame::json(
        Frame::GoAway,
        &GoAway {
            reason,
            reconnect_after_ms,
        },
    )
}

/// Reads and checks HELLO. `Err(None)`: the peer left silently.
async fn handshake(
    shared: &Shared,
    stream: &DeviceStream,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(DeviceId, Hello, Verdict), Option<Refusal>> {
    let frame = match tokio::time::timeout_at(deadline, read_first_frame(shared, stream, buf)).await
    {
        Err(_) => {
            return Err(Some(Refusal::new(
                ErrorCode::HelloTimeout,
                format!(
                    "no HELLO within {} ms of connecting",
                    shared.config.hello_timeout_ms
                ),
            )));
        }
        Ok(Ok(None)) => return Err(None),
        Ok(Ok(Some(f))) => f,
        Ok(Err(e)) => return Err(Some(Refusal::new(e.code(), e.to_string()))),
    };
    shared.metrics.frame_in(frame.kind(), frame.wire_len());
    let Frame::Hello(body) = frame else {
        return Err(Some(Refusal::new(
            ErrorCode::ProtocolViolation,
            format!(
                "the first frame must be HELLO, got {}",
                frame.name().to_uppercase()
            ),
        )));
    };
    // Id and token first, skipping the rest unbuilt: an unauthenticated peer's metadata is
    // never turned into values.
    let login: HelloLogin = serde_json::from_slice(&body).map_err(|e| {
        Some(Refusal::new(
            ErrorCode::BadHello,
            format!("HELLO body is not {{\"device_id\", \"token\"}} JSON: {e}"),
        ))
    })?;
    let id = DeviceId::parse(&login.device_id).map_err(|e| {
        Some(Refusal::new(
            ErrorCode::BadDeviceId,
            format!("device id {}: {e}", quoted_prefix(&login.device_id)),
        ))
    })?;
    let verdict = shared.auth.verify(id.as_str(), &login.token);
    if !verdict.admits() {
        return Err(Some(Refusal::new(
            ErrorCode::Unauthorized,
            "token does not match the device id",
        )));
    }
    // After the token too: only the holder of the id's token learns what its certificate is
    // not.
    // With certificate authentication the binding *is* the authentication: it runs even if
    // the gateway were started without a client CA (an unvalidated config), and then refuses.
    if shared.device_tls.as_ref().is_some_and(|t| t.binds_ids())
        || matches!(shared.auth, crate::auth::DeviceAuth::Certificate)
    {
        let binding = stream
            .with_tls(|tls| crate::device_tls::check_binding(tls, &id))
            .unwrap_or_else(|| Err("not a TLS connection".to_owned()));
        if let Err(why) = binding {
            shared.metrics.tls_identity_mismatches.inc();
            return Err(Some(Refusal::new(ErrorCode::Unauthorized, why)));
        }
    }
    // After the token: only the device's own token learns that its id is revoked.
    if shared.denylist.contains(&id) {
        shared.metrics.denied_logins.inc();
        return Err(Some(revoked()));
    }
    if let Err(wait_s) = shared.login_limit.admit(&id, unix_ms() / 1000) {
        shared.metrics.logins_throttled.inc();
        return Err(Some(Refusal::new(
            ErrorCode::Overloaded,
            format!(
                "device {id} logged in {} times within {} s on this gateway; retry in {wait_s} s",
                shared.config.max_logins_per_id, shared.config.login_window_s
            ),
        )));
    }
    let hello: Hello = serde_json::from_slice(&body).map_err(|e| {
        Some(Refusal::new(
            ErrorCode::BadHello,
            format!("HELLO body is not {{\"device_id\", \"token\"}} JSON: {e}"),
        ))
    })?;
    if let Err(e) = hello.check_metadata() {
        return Err(Some(Refusal::new(
            ErrorCode::BadHello,
            format!("HELLO metadata refused: {e}"),
        )));
    }
    if !shared.bus.is_connected() {
        return Err(Some(Refusal::new(
            ErrorCode::Unavailable,
            "the message bus is unreachable; reconnect later",
        )));
    }
    Ok((id, hello, verdict))
}

/// The refusal of a device on the denylist: `unauthorized`, which devices treat as "do not
/// retry at once", unlike a GOAWAY.
fn revoked() -> Refusal {
    Refusal::new(
        ErrorCode::Unauthorized,
        "this device id is revoked (on the gateway's denylist)",
    )
}

/// Everything a login decides before WELCOME.
enum LoginOutcome {
    /// This session holds the device. `early` are messages routed to it before WELCOME;
    /// `took_over`: a session elsewhere let the device go for it.
    Won {
        sub: Subscription,
        early: Vec<Msg>,
        took_over: bool,
    },
    /// A newer session (or shutdown) took precedence: close with this GOAWAY.
    Lost(GoAwayReason),
    /// NATS could not be used.
    Failed(Refusal),
}

/// Result of one claim request.
pub(crate) enum ClaimRound {
    /// Nobody else holds or claims the device.
    Clear,
    /// A holder let go; ask again (another may remain). `held`: it was a live session.
    Released { held: bool },
    /// Someone with a newer claim holds on.
    Superseded,
}

fn delivery_reply(
    shared: &Shared,
    session: &str,
    status: DeliveryStatus,
    seq: u32,
    reason: Option<&str>,
) -> Bytes {
    json_bytes(&DeliveryReply {
        status,
        gateway: shared.instance.clone(),
        session: session.to_owned(),
        seq,
        reason: reason.map(str::to_owned),
    })
}

fn json_bytes<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn control_op(msg: &Msg) -> Option<Result<ControlOp, String>> {
    let value = msg.header(headers::CONTROL)?;
    Some(ControlOp::from_token(value).ok_or_else(|| value.to_owned()))
}

fn kicked(shared: &Shared, session: &str) -> KickReply {
    KickReply {
        status: "kicked".into(),
        gateway: shared.instance.clone(),
        session: session.to_owned(),
    }
}

fn released(shared: &Shared, session: &str, held: bool) -> ClaimReply {
    ClaimReply::Released {
        key: ClaimKey {
            login_ns: 0,
            gateway: shared.instance.clone(),
            session: session.to_owned(),
        },
        held,
    }
}

/// Answers a message routed to `session` that will never be written to its device: a request
/// hears `session_closed` (control requests the answer their operation expects); a plain
/// publish is counted as dropped.
fn undeliverable(shared: &Shared, session: &str, msg: Msg) {
    let op = control_op(&msg);
    let Some(reply) = msg.reply else {
        if op.is_none() {
            shared.metrics.downlink(Downlink::Dropped);
        }
        return;
    };
    // Every request gets an answer, control requests included.
    let body = match op {
        None => {
            shared.metrics.downlink(Downlink::Failed);
            delivery_reply(
                shared,
                session,
                DeliveryStatus::Failed,
                0,
                Some("session_closed"),
            )
        }
        Some(Ok(ControlOp::Claim | ControlOp::Reclaim)) => {
            json_bytes(&released(shared, session, false))
        }
        Some(Ok(ControlOp::Kick)) => json_bytes(&kicked(shared, session)),
        Some(Ok(ControlOp::Presence)) | Some(Err(_)) => {
            json_bytes(&crate::contract::ControlError {
                error: "session_closed".into(),
                message: "the session ended while the request was queued; the device is offline"
                    .into(),
            })
        }
    };
    publish_reply(shared, &reply, &body);
}

/// Whether the gateway may answer a request at reply subject `to`. Its NATS user may publish
/// uplink, presence and `devgate.>`, and a requester chooses the reply subject freely: answering
/// `device.Y.up` or `devgate.gateway.announce` would publish there with the gateway's rights
/// (a service forging device Y's uplink). So nothing under `device.` or `devgate.` is answered,
/// except the gateways' own inbox (claims between gateways). Any other inbox prefix is fine:
/// clients may choose their own, and the requester's permissions cover who may read it.
pub(crate) fn reply_allowed(to: &[u8]) -> bool {
    to.starts_with(subjects::GATEWAY_INBOX_PREFIX.as_bytes())
        || !(to.starts_with(b"device.") || to.starts_with(b"devgate."))
}

/// Publishes a reply. Failures are logged, not raised: the requester times out, which is what
/// it would see if the reply were lost on the way. A reply subject that is not
/// [`reply_allowed`] is not answered: counted, and logged at debug (a warning per message
/// would let the forger flood the log).
pub(crate) fn publish_reply(shared: &Shared, to: &[u8], body: &[u8]) {
    if !reply_allowed(to) {
        shared.metrics.replies_refused.inc();
        let shown = String::from_utf8_lossy(&to[..to.len().min(128)]);
        tracing::debug!(instance = %shared.instance, reply = %shown, "not answering a request whose reply subject is a devgate subject");
        return;
    }
    if let Err(error) = shared.bus.link().publish_now(to, None, Headers::None, body) {
        tracing::debug!(%error, "could not publish a reply");
    }
}

/// Sends one `claim` or `reclaim` for `key` on `down` (waiting up to the claim timeout) and
/// reads the answer; "no responders" means nobody else holds or claims the device. `None`: an
/// answer that is not a `ClaimReply` (a gateway of an older version answering a `reclaim` it
/// does not know with `bad_request`, say).
pub(crate) async fn claim_request(
    shared: &Shared,
    op: ControlOp,
    down: &str,
    key: &ClaimKey,
    subscribed: bool,
) -> Result<Option<ClaimRound>, RequestError> {
    let timeout = Duration::from_millis(shared.config.claim_timeout_ms);
    let control = [(headers::CONTROL, op.token())];
    let body = json_bytes(&ClaimRequest {
        key: key.clone(),
        subscribed,
    });
    let request = shared
        .bus
        .link()
        .request(down, Headers::Pairs(&control), &body, timeout);
    match request.await {
        Ok(reply) => match serde_json::from_slice::<ClaimReply>(&reply.payload) {
            Ok(ClaimReply::Released { held, .. }) => Ok(Some(ClaimRound::Released { held })),
            Ok(ClaimReply::Superseded { .. }) => Ok(Some(ClaimRound::Superseded)),
            Err(_) => Ok(None),
        },
        Err(RequestError::NoResponders) => Ok(Some(ClaimRound::Clear)),
        Err(e) => Err(e),
    }
}

/// One claim round of a login.
async fn claim_round(
    shared: &Shared,
    down: &str,
    key: &ClaimKey,
    subscribed: bool,
) -> Result<ClaimRound, Refusal> {
    match claim_request(shared, ControlOp::Claim, down, key, subscribed).await {
        Ok(Some(round)) => Ok(round),
        Ok(None) => {
            tracing::warn!(device_id = %key_device(down), "unreadable claim reply; treating it as released");
            Ok(ClaimRound::Released { held: false })
        }
        Err(RequestError::TimedOut) => {
            // A holder that does not answer within the claim timeout is partitioned or hung:
            // availability wins, the new session proceeds (the old one yields when it sees
            // this device's next claim or its own connection fails).
            tracing::warn!(device_id = %key_device(down), "previous holder did not answer the claim in time");
            Ok(ClaimRound::Clear)
        }
        Err(e) => Err(Refusal::new(
            ErrorCode::Unavailable,
            format!("message bus error during login: {e}"),
        )),
    }
}

fn key_device(down: &str) -> &str {
    down.split('.').nth(1).unwrap_or("")
}

/// A message arrives for a session that is not welcomed yet.
enum Pending {
    /// Keep going.
    Continue,
    /// A newer claim arrived: give up, then answer it (at this reply subject). `subscribed`:
    /// the claimant said it already subscribed.
    Yield { reply: Bytes, subscribed: bool },
}

/// Login: settle local and cluster-wide ownership of the device and welcome it. `None` when
/// the login lost or failed (the connection is closed by then).
async fn welcome(shared: Arc<Shared>, greeted: Greeted) -> Option<(Session, Vec<Msg>)> {
    let Greeted {
        mut conn,
        id,
        hello,
        remote,
        verdict,
    } = greeted;
    let session = format!("{:016x}", rand::random::<u64>());
    let key = ClaimKey {
        login_ns: unix_ns(),
        gateway: shared.instance.clone(),
        session: session.clone(),
    };
    let (commands_tx, mut commands) = crate::registry::command_channel();
    let displaced = shared.registry.insert(
        id.clone(),
        Entry {
            session: session.clone(),
            login_ns: key.login_ns,
            commands: Some(commands_tx),
            releasing: None,
            summary: None,
            replaces_welcomed: false,
        },
    );
    // The denylist may have changed since the handshake checked it. Its watcher puts a new
    // list in force and then revokes what is registered; this login registered above, so
    // either the watcher finds it or this check sees the new list.
    if shared.denylist.contains(&id) {
        if let Some(commands) = displaced.and_then(|old| old.commands) {
            let _ = commands.send(SessionCommand::Revoke);
        }
        shared.registry.remove(&id, &session);
        shared.metrics.denied_logins.inc();
        refuse(&shared, &mut conn, remote, Some(&id), revoked()).await;
        return None;
    }
    // A takeover only when the session displaced here had been welcomed (or had itself
    // displaced one); a rival login that never was replaced nothing (as `held` says for one on
    // another gateway).
    let replaced_here = displaced.as_ref().is_some_and(Entry::holds_welcomed);
    // An older session of the device here: tell it to release, or, if it was already told
    // (a reclaim found a newer session elsewhere), wait for that release all the same.
    let released = displaced.and_then(|old| match old.commands {
        Some(sender) => {
            let (done, released) = oneshot::channel();
            sender
                .send(SessionCommand::Release { done })
                .ok()
                .map(|()| released)
        }
        None => old.releasing,
    });
    if let Some(released) = released {
        let _ = tokio::time::timeout(
            Duration::from_millis(shared.config.claim_timeout_ms),
            released,
        )
        .await;
    }

    let outcome = tokio::select! {
        o = Box::pin(login(&shared, &id, &key, &mut commands)) => o,
        () = shared.hard_stop.cancelled() => LoginOutcome::Lost(GoAwayReason::Draining),
    };
    let (sub, early) = match outcome {
        // The drain began while this login was deciding: a draining gateway welcomes nobody
        // (its own moment in the drain schedule may be seconds away); the device reconnects
        // elsewhere. Nobody else holds the device (this login won), so what reached the
        // subscription is answered here: handed back to NATS, requests would wait out their
        // timeout (NATS tells only the republisher there are no responders).
        LoginOutcome::Won { mut sub, early, .. } if shared.draining.is_cancelled() => {
            give_up(&shared, &mut sub, early, &session).await;
            shared.registry.remove(&id, &session);
            tracing::info!(device_id = %id, session = %session, "login completed while draining; sent elsewhere");
            goodbye(&shared, &mut conn, GoAwayReason::Draining).await;
            return None;
        }
        LoginOutcome::Won {
            sub,
            early,
            took_over,
        } => {
            // Counted once per login that replaced a session, here or on another gateway.
            if replaced_here || took_over {
                shared.metrics.takeovers.inc();
            }
            (sub, early)
        }
        LoginOutcome::Lost(reason) => {
            shared.registry.remove(&id, &session);
            tracing::info!(device_id = %id, session = %session, reason = reason.as_str(), "login superseded");
            goodbye(&shared, &mut conn, reason).await;
            return None;
        }
        LoginOutcome::Failed(r) => {
            shared.registry.remove(&id, &session);
            refuse(&shared, &mut conn, remote, Some(&id), r).await;
            return None;
        }
    };

    let welcome = Frame::json(
        Frame::Welcome,
        &Welcome {
            session: session.clone(),
            gateway: shared.instance.clone(),
            heartbeat_s: shared.config.heartbeat_s,
            max_frame_len: shared.codec.max_frame_len(),
        },
    );
    shared.metrics.frame_out(welcome.kind(), welcome.wire_len());
    let _ = conn.writer.queue(welcome);
    let since_ms = unix_ms();
    let remote_addr = remote.to_string();
    shared.registry.welcome(
        &id,
        &session,
        SessionSummary {
            device_id: id.clone(),
            session: session.clone(),
            since_ms,
            remote_addr: remote_addr.clone(),
        },
    );
    shared.metrics.logins.inc();
    if verdict == Verdict::PreviousSecret {
        shared.metrics.logins_previous_secret.inc();
    }
    shared.metrics.sessions.inc();
    tracing::info!(device_id = %id, session = %session, remote = %remote_addr, "device connected");

    let s = Session {
        up: subjects::up(&id),
        shared: shared.clone(),
        conn,
        id,
        session,
        since_ms,
        remote_addr,
        metadata: hello.metadata,
        sub,
        commands,
        sent_waiters: VecDeque::new(),
        acks: HashMap::new(),
        ack_deadlines: VecDeque::new(),
        next_seq: 0,
        uplink: VecDeque::new(),
        last_frame: Instant::now(),
        last_write: Instant::now(),
        up_bucket: UpBucket::full(&shared.config, Instant::now()),
    };
    s.presence(PresenceEventKind::Connected, None);
    Some((s, early))
}

/// A welcomed session from its first message to its end. Its own allocation: an idle device
/// pays for this state only, not for the login's. (Written as a function returning an async
/// block because an `async fn` keeps its by-value parameters twice in its state, as the
/// parameter and as the local it is moved into: 500 bytes per device here.)
#[allow(clippy::manual_async_fn)] // deliberate: see above
fn live(mut s: Session, early: Vec<Msg>) -> impl Future<Output = ()> {
    async move {
        // What arrived during the login goes back in front of the subscription's queue, so the
        // loop handles it like any burst, in order (written as it goes, so a long login's
        // backlog is not taken for a device that does not read) and a release or the end of the
        // session treats it like everything routed after it.
        s.sub.requeue_front(early);
        let end = s.run().await;
        Box::pin(s.finish(end)).await;
    }
}

/// Claims the device across gateways, subscribes, and re-checks for a concurrent claimant.
async fn login(
    shared: &Shared,
    id: &DeviceId,
    key: &ClaimKey,
    commands: &mut CommandReceiver,
) -> LoginOutcome {
    let down = subjects::down(id);
    let mut took_over = false;
    // Phase 1: make every current holder let go.
    for _ in 0..MAX_CLAIM_ROUNDS {
        match claim_round(shared, &down, key, false).await {
            Ok(ClaimRound::Clear) => break,
            Ok(ClaimRound::Released { held }) => took_over |= held,
            Ok(ClaimRound::Superseded) => return LoginOutcome::Lost(GoAwayReason::Replaced),
            Err(r) => return LoginOutcome::Failed(r),
        }
    }
    // Phase 2: become visible, then confirm no concurrent claimant subscribed meanwhile.
    let mut sub = shared.bus.link().subscribe(&down);
    let mut early = Vec::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let round = claim_round(shared, &down, key, true);
        tokio::pin!(round);
        let decided = loop {
            tokio::select! {
                r = &mut round => break Some(r),
                msg = sub.next() => match msg {
                    Some(msg) => match pending_message(shared, key, msg, &mut early).await {
                        Pending::Continue => {}
                        Pending::Yield { reply, subscribed } => {
                            // A claimant that subscribed before it claimed also gets whatever
                            // reaches this subscription after its claim.
                            let winner = if subscribed {
                                Winner::Subscribed
                            } else {
                                Winner::Unknown
                            };
                            hand_off_until(shared, &mut sub, early, winner).await;
                            let reply_body = json_bytes(&ClaimReply::Released {
                                key: key.clone(),
                                held: false,
                            });
                            publish_reply(shared, &reply, &reply_body);
                            return LoginOutcome::Lost(GoAwayReason::Replaced);
                        }
                    },
                    None => break None,
                },
                cmd = commands.recv() => {
                    // A newer login here (which subscribes only once this one let go) or the
                    // drain: no other session holds the device, and a hand-back could not reach
                    // one on this gateway anyway (no_echo). Answer instead.
                    give_up(shared, &mut sub, early, &key.session).await;
                    return match cmd {
                        SessionCommand::Release { done } => {
                            let _ = done.send(());
                            LoginOutcome::Lost(GoAwayReason::Replaced)
                        }
                        SessionCommand::Drain { .. } => LoginOutcome::Lost(GoAwayReason::Draining),
                        SessionCommand::Revoke => {
                            shared.metrics.denied_logins.inc();
                            LoginOutcome::Failed(revoked())
                        }
                    };
                }
            }
        };
        // NATS answers the `SUB` before the claim sent after it, so a refused subscription has
        // ended by the time a round is decided (the round and the end may be ready together).
        if sub.is_ended() {
            return LoginOutcome::Failed(Refusal::new(
                ErrorCode::Unavailable,
                "the device's NATS subscription ended (refused by the server, or the link stopped)",
            ));
        }
        match decided {
            Some(Ok(ClaimRound::Clear)) => {
                return LoginOutcome::Won {
                    sub,
                    early,
                    took_over,
                };
            }
            Some(Ok(ClaimRound::Released { held })) if rounds < MAX_CLAIM_ROUNDS => {
                took_over |= held;
            }
            Some(Ok(ClaimRound::Released { held })) => {
                return LoginOutcome::Won {
                    sub,
                    early,
                    took_over: took_over || held,
                };
            }
            Some(Ok(ClaimRound::Superseded)) => {
                hand_off(shared, &mut sub, early).await;
                return LoginOutcome::Lost(GoAwayReason::Replaced);
            }
            Some(Err(r)) => {
                hand_off(shared, &mut sub, early).await;
                return LoginOutcome::Failed(r);
            }
            None => {
                return LoginOutcome::Failed(Refusal::new(
                    ErrorCode::Unavailable,
                    "subscription closed during login",
                ));
            }
        }
    }
}

/// A message for a session still logging in: claims are decided by key, data is kept for after
/// WELCOME (or handed back to NATS if this login loses), and other control waits its turn.
async fn pending_message(
    shared: &Shared,
    key: &ClaimKey,
    msg: Msg,
    early: &mut Vec<Msg>,
) -> Pending {
    match control_op(&msg) {
        // A re-check from a welcomed session elsewhere is decided like a concurrent login.
        Some(Ok(ControlOp::Claim | ControlOp::Reclaim)) => {
            let Some(reply) = msg.reply.clone() else {
                return Pending::Continue;
            };
            match serde_json::from_slice::<ClaimRequest>(&msg.payload) {
                Ok(req) if req.key > *key => Pending::Yield {
                    reply,
                    subscribed: req.subscribed,
                },
                Ok(_) => {
                    let body = json_bytes(&ClaimReply::Superseded { key: key.clone() });
                    publish_reply(shared, &reply, &body);
                    Pending::Continue
                }
                Err(error) => {
                    publish_reply(shared, &reply, &unreadable_claim(&error));
                    Pending::Continue
                }
            }
        }
        _ => {
            early.push(msg);
            Pending::Continue
        }
    }
}

/// The answer to a claim or reclaim whose body is not a `ClaimRequest`.
fn unreadable_claim(error: &serde_json::Error) -> Bytes {
    json_bytes(&crate::contract::ControlError {
        error: "bad_request".into(),
        message: format!("unreadable claim body: {error}"),
    })
}

/// Gives up a subscription taken during a login that nobody else will take over from (it won
/// while draining, or a newer login on this gateway waits for it): drain it, and answer what
/// reached it as [`undeliverable`], so requests fail at once instead of timing out.
async fn give_up(shared: &Shared, sub: &mut Subscription, early: Vec<Msg>, session: &str) {
    let limit = Duration::from_millis(shared.config.claim_timeout_ms);
    let _ = sub.drain(limit).await;
    for msg in early
        .into_iter()
        .chain(std::iter::from_fn(|| sub.try_next()))
    {
        undeliverable(shared, session, msg);
    }
}

/// Gives up a subscription taken during a lost login: drain it, and republish everything it
/// received so the winning session (subscribed by now) gets it. Nothing is answered twice: only
/// the winner replies.
async fn hand_off(shared: &Shared, sub: &mut Subscription, early: Vec<Msg>) {
    hand_off_until(shared, sub, early, Winner::Unknown).await;
}

/// What a yielding login knows about the session it yields to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Winner {
    /// Its claim reached this subscription, and it subscribed before claiming: NATS routes
    /// everything after that claim to it too.
    Subscribed,
    /// It may not have subscribed yet (or there is none): every message goes back to NATS.
    Unknown,
}

/// [`hand_off`], where messages that came after the winner's claim are not republished when
/// the winner has them already (republishing those would deliver them twice).
async fn hand_off_until(
    shared: &Shared,
    sub: &mut Subscription,
    mut early: Vec<Msg>,
    winner: Winner,
) {
    let limit = Duration::from_millis(shared.config.claim_timeout_ms);
    let _ = sub.drain(limit).await;
    let before_winner = early.len();
    while let Some(msg) = sub.try_next() {
        early.push(msg);
    }
    let link = shared.bus.link();
    for (index, msg) in early.into_iter().enumerate() {
        let winner_has_it = winner == Winner::Subscribed && index >= before_winner;
        if matches!(
            control_op(&msg),
            Some(Ok(ControlOp::Claim | ControlOp::Reclaim))
        ) {
            if let Some(reply) = msg.reply {
                // We hold nothing; tell the claimant so (it will re-check).
                let body = json_bytes(&ClaimReply::Released {
                    key: ClaimKey {
                        login_ns: 0,
                        gateway: shared.instance.clone(),
                        session: String::new(),
                    },
                    held: false,
                });
                publish_reply(shared, &reply, &body);
            }
            continue;
        }
        if winner_has_it {
            continue;
        }
        let headers = msg.raw_headers().map_or(Headers::None, Headers::Raw);
        if let Err(error) = link
            .publish(&msg.subject, msg.reply.as_deref(), headers, &msg.payload)
            .await
        {
            tracing::warn!(%error, "could not hand a message back to NATS; its sender will time out");
        }
    }
}

/// Resolves when the bus state changes (`false`: it never will again), handing the receiver
/// back so the next wait can start from it.
async fn next_change(mut rx: watch::Receiver<bool>) -> (watch::Receiver<bool>, bool) {
    let open = rx.changed().await.is_ok();
    (rx, open)
}

/// What woke a welcomed session.
enum Event {
    Command(SessionCommand),
    HardStop,
    Bus(Option<Msg>),
    Written(std::io::Result<usize>),
    Frame(Result<Option<Frame>, crate::codec::CodecError>),
    Uplink {
        seq: u32,
        ok: bool,
    },
    Timer,
    /// The connection state changed (`false`: the bus is gone for good).
    BusState(bool),
}

/// A welcomed session.
struct Session {
    shared: Arc<Shared>,
    conn: Conn,
    id: DeviceId,
    session: String,
    since_ms: u64,
    remote_addr: String,
    metadata: serde_json::Map<String, serde_json::Value>,
    up: String,
    sub: Subscription,
    commands: CommandReceiver,
    /// Requests to answer `sent` once the writer passes the given stream offset.
    sent_waiters: VecDeque<(u64, Bytes)>,
    /// DOWN frames awaiting the device's ACK: seq -> reply subject.
    acks: HashMap<u32, Bytes>,
    /// Expiry order of `acks` (constant timeout, so insertion order is deadline order).
    ack_deadlines: VecDeque<(u32, Instant)>,
    next_seq: u32,
    /// UP frames awaiting NATS confirmation, in publish order.
    uplink: VecDeque<(u32, oneshot::Receiver<bool>)>,
    last_frame: Instant,
    last_write: Instant,
    /// This session's uplink allowance.
    up_bucket: UpBucket,
}

/// A token bucket over UP messages and bytes (`up_rate_msgs`, `up_rate_bytes`, `up_burst_ms`).
/// Policy when empty: the session stops reading its socket until the allowance is back to
/// zero, so a flooding device is paced by TCP backpressure and nothing is dropped. A frame
/// already read is always taken (its size is known only then), so the balance may go negative;
/// over any window `W` a session publishes at most `burst + rate × W + 1` UPs.
#[derive(Debug)]
struct UpBucket {
    msgs: f64,
    bytes: f64,
    at: Instant,
}

impl UpBucket {
    fn full(config: &crate::config::Config, now: Instant) -> Self {
        let (msgs, bytes) = Self::burst(config);
        UpBucket {
            msgs,
            bytes,
            at: now,
        }
    }

    fn burst(config: &crate::config::Config) -> (f64, f64) {
        let seconds = config.up_burst_ms as f64 / 1000.0;
        (
            config.up_rate_msgs as f64 * seconds,
            config.up_rate_bytes as f64 * seconds,
        )
    }

    fn refill(&mut self, config: &crate::config::Config, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let (max_msgs, max_bytes) = Self::burst(config);
        self.msgs = (self.msgs + elapsed * config.up_rate_msgs as f64).min(max_msgs);
        self.bytes = (self.bytes + elapsed * config.up_rate_bytes as f64).min(max_bytes);
        self.at = now;
    }

    fn ready(&self) -> bool {
        self.msgs >= 0.0 && self.bytes >= 0.0
    }

    /// Takes one UP of `wire_len` bytes; `true` when this used the allowance up.
    fn take(&mut self, config: &crate::config::Config, now: Instant, wire_len: usize) -> bool {
        self.refill(config, now);
        self.msgs -= 1.0;
        self.bytes -= wire_len as f64;
        !self.ready()
    }

    /// Whether reading must pause now (refilling first).
    fn throttled(&mut self, config: &crate::config::Config) -> bool {
        if self.ready() {
            return false;
        }
        self.refill(config, Instant::now());
        !self.ready()
    }

    /// When the balance is back to zero (rounded up, so the timer never fires early).
    fn ready_at(&self, config: &crate::config::Config) -> Instant {
        let wait = (-self.msgs / config.up_rate_msgs as f64)
            .max(-self.bytes / config.up_rate_bytes as f64)
            .max(0.0);
        self.at + Duration::from_secs_f64(wait) + Duration::from_micros(1)
    }
}

/// Polls the oldest uplink confirmation (they complete in order). Cancel-safe: the entry is
/// removed only when it is ready.
fn poll_uplink(
    queue: &mut VecDeque<(u32, oneshot::Receiver<bool>)>,
    cx: &mut Context<'_>,
) -> Poll<(u32, bool)> {
    let Some((seq, rx)) = queue.front_mut() else {
        return Poll::Pending;
    };
    match Pin::new(rx).poll(cx) {
        Poll::Ready(result) => {
            let seq = *seq;
            queue.pop_front();
            Poll::Ready((seq, result.unwrap_or(false)))
        }
        Poll::Pending => Poll::Pending,
    }
}

impl Session {
    /// Device, session and gateway headers of uplink and presence messages, written straight
    /// into the connection's buffer (no per-message header map).
    fn identity_headers(&self) -> [(&'static str, &str); 3] {
        [
            (headers::DEVICE, self.id.as_str()),
            (headers::SESSION, self.session.as_str()),
            (headers::GATEWAY, self.shared.instance.as_str()),
        ]
    }

    fn presence_info(&self) -> PresenceInfo {
        PresenceInfo {
            device_id: self.id.clone(),
            gateway: self.shared.instance.clone(),
            session: self.session.clone(),
            since_ms: self.since_ms,
            remote_addr: self.remote_addr.clone(),
            metadata: self.metadata.clone(),
        }
    }

    fn kicked(&self) -> KickReply {
        kicked(&self.shared, &self.session)
    }

    /// What this session answers a claim with once it has let go; `held`: this claim is the
    /// one that made a live session yield (later ones replaced nothing).
    fn released(&self, held: bool) -> ClaimReply {
        released(&self.shared, &self.session, held)
    }

    fn idle_limit(&self) -> Duration {
        self.shared.config.heartbeat() * 3
    }

    /// The earliest timer: idle (only while the gateway is reading, i.e. NATS is up), device
    /// ACK expiry, write stall.
    fn next_deadline(&self, reading: bool) -> Instant {
        let mut d = if reading {
            self.last_frame + self.idle_limit()
        } else {
            Instant::now() + self.idle_limit()
        };
        if let Some((_, t)) = self.ack_deadlines.front() {
            d = d.min(*t);
        }
        if self.conn.write_pending() {
            d = d.min(self.last_write + Duration::from_millis(self.shared.config.write_timeout_ms));
        }
        d
    }

    async fn run(&mut self) -> End {
        let connected = self.shared.bus.connected_watch();
        // Gateway-wide signals are waited on by futures created once (and again only after
        // they fire), not once per loop turn: each creation and drop takes the lock of a
        // waiter list shared by every session, which under load is contended on every message.
        let shared = self.shared.clone();
        let hard_stop = shared.hard_stop.cancelled();
        tokio::pin!(hard_stop);
        let mut bus_change = Box::pin(next_change(connected.clone()));
        let timer = tokio::time::sleep_until(self.next_deadline(true));
        tokio::pin!(timer);
        let max_inflight = self.shared.config.max_inflight;
        let queue_limit = self.shared.config.session_queue_bytes;
        let mut bus_was_up = true;
        loop {
            let bus_up = *connected.borrow();
            if bus_up && !bus_was_up {
                // While NATS was away the gateway, not the device, stopped reading: the
                // device's heartbeats wait in the socket. Restart the idle clock.
                self.last_frame = Instant::now();
            }
            bus_was_up = bus_up;
            let throttled = self.up_bucket.throttled(&self.shared.config);
            let mut deadline = self.next_deadline(bus_up);
            if throttled {
                deadline = deadline.min(self.up_bucket.ready_at(&self.shared.config));
            }
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            // Backpressure: stop reading (never drop) while NATS is away, while too many UPs
            // await confirmation, while the device is not reading what we send it, or while it
            // is over its uplink rate.
            let can_read = !throttled
                && bus_up
                && self.uplink.len() < max_inflight
                && self.conn.writer.pending() < queue_limit;
            let write_pending = self.conn.write_pending();
            // The select only picks what happened; handling it comes after, once the branch
            // futures are dropped. (Awaiting inside a branch would keep them all alive beside
            // the handler's own state, and a session future's size is paid by every idle
            // device.)
            let event = tokio::select! {
                cmd = self.commands.recv() => Event::Command(cmd),
                () = &mut hard_stop => Event::HardStop,
                msg = self.sub.next() => Event::Bus(msg),
                written = std::future::poll_fn(|cx| self.conn.writer.poll_write_some(&self.conn.stream, cx)), if write_pending => Event::Written(written),
                frame = std::future::poll_fn(|cx| self.conn.reader.poll_frame(&self.conn.stream, cx)), if can_read => Event::Frame(frame),
                (seq, ok) = std::future::poll_fn(|cx| poll_uplink(&mut self.uplink, cx)), if !self.uplink.is_empty() => Event::Uplink { seq, ok },
                () = &mut timer => Event::Timer,
                // Any change re-evaluates `can_read`: reading stops the moment NATS goes away.
                (rx, open) = &mut bus_change => {
                    bus_change = Box::pin(next_change(rx));
                    Event::BusState(open)
                }
            };
            // A write the loop just made was partial (the socket is full): no second try.
            let just_wrote = matches!(event, Event::Written(_));
            let mut result: Result<(), End> = match event {
                Event::Command(SessionCommand::Release { done }) => {
                    let end = Box::pin(self.release(GoAwayReason::Replaced)).await;
                    let _ = done.send(());
                    Err(end)
                }
                Event::Command(SessionCommand::Drain { reconnect_after_ms }) => Err(Box::pin(
                    self.release_with(GoAwayReason::Draining, Some(reconnect_after_ms)),
                )
                .await),
                Event::Command(SessionCommand::Revoke) => {
                    self.shared.metrics.revoked_sessions.inc();
                    Err(End::Error(revoked()))
                }
                Event::HardStop => Err(End::Shutdown),
                Event::Bus(Some(msg)) => self.on_bus_messages(msg).await,
                // The link ends a subscription when NATS refused it (permissions, after a
                // reconnect under changed ones) or when it stops: nothing reaches the device.
                Event::Bus(None) => Err(End::Error(Refusal::new(
                    ErrorCode::Unavailable,
                    "the device's NATS subscription ended (refused by the server, or the link stopped)",
                ))),
                Event::Written(Ok(_)) => {
                    self.wrote();
                    Ok(())
                }
                Event::Written(Err(e)) => Err(End::Io(e.to_string())),
                Event::Frame(Ok(Some(frame))) => self.on_frame(frame).await,
                Event::Frame(Ok(None)) => Err(End::Closed),
                Event::Frame(Err(crate::codec::CodecError::Io(io))) => Err(End::Io(io.to_string())),
                Event::Frame(Err(other)) => {
                    Err(End::Error(Refusal::new(other.code(), other.to_string())))
                }
                Event::Uplink { seq, ok: true } => {
                    self.shared.metrics.uplink(Uplink::Acked);
                    self.send(Frame::Ack(seq))
                }
                Event::Uplink { seq, ok: false } => {
                    self.shared.metrics.uplink(Uplink::Unconfirmed);
                    tracing::debug!(device_id = %self.id, seq, "uplink not confirmed by NATS; not acknowledged");
                    Ok(())
                }
                Event::Timer => self.on_timer(bus_up),
                Event::BusState(true) => Ok(()),
                Event::BusState(false) => Err(End::Shutdown),
            };
            if result.is_ok() && !just_wrote && self.conn.write_pending() {
                result = self.write_now();
            }
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Handles `first` and whatever else already waits in the subscription (up to a bound, so
    /// a busy device cannot starve its own socket), so that one write carries several small
    /// frames. The queue is written out whenever it passes a few KiB: a message finding the
    /// queue full must mean the device is not reading, not that this loop has not written yet.
    async fn on_bus_messages(&mut self, first: Msg) -> Result<(), End> {
        const BATCH: usize = 64;
        self.on_bus_message(first).await?;
        for _ in 1..BATCH {
            let Some(msg) = self.sub.try_next() else {
                break;
            };
            self.write_when_due()?;
            self.on_bus_message(msg).await?;
        }
        Ok(())
    }

    /// Writes the queue once a batch has filled a good part of it, so a full queue still means
    /// "the device is not reading" and not "many messages came at once".
    fn write_when_due(&mut self) -> Result<(), End> {
        let write_at = (self.shared.config.session_queue_bytes / 4).min(16 * 1024);
        if self.conn.writer.pending() >= write_at {
            self.write_now()?;
        }
        Ok(())
    }

    /// Writes what the last event queued without waiting for another turn of the event loop:
    /// the socket almost always has room, and this saves a task wakeup and two timer resets
    /// per downlink message. What the socket does not take is written by the loop's
    /// write branch once it is writable.
    fn write_now(&mut self) -> Result<(), End> {
        match self.conn.writer.try_write_some(&self.conn.stream) {
            Ok(0) => Ok(()),
            Ok(_) => {
                self.wrote();
                Ok(())
            }
            Err(e) => Err(End::Io(e.to_string())),
        }
    }

    /// Bytes reached the socket: the write-stall clock restarts and `sent` answers are due.
    fn wrote(&mut self) {
        self.last_write = Instant::now();
        self.resolve_sent();
    }

    /// Queues a frame to the device.
    fn send(&mut self, frame: Frame) -> Result<(), End> {
        self.shared
            .metrics
            .frame_out(frame.kind(), frame.wire_len());
        if self.conn.writer.pending() == 0 {
            // The write-stall clock starts when the queue stops being empty, not at the last
            // write, which may be long ago on a quiet session.
            self.last_write = Instant::now();
        }
        self.conn
            .writer
            .queue(frame)
            .map(|_| ())
            .map_err(|e| End::Error(Refusal::new(ErrorCode::Internal, e.to_string())))
    }

    fn reply(&self, to: Bytes, body: Bytes) {
        publish_reply(&self.shared, &to, &body);
    }

    fn reply_delivery(&self, to: Bytes, status: DeliveryStatus, seq: u32, reason: Option<&str>) {
        let body = delivery_reply(&self.shared, &self.session, status, seq, reason);
        self.reply(to, body);
    }

    /// Answers `sent` for every request whose DOWN frame has fully reached the socket.
    fn resolve_sent(&mut self) {
        let written = self.conn.writer.written();
        while self
            .sent_waiters
            .front()
            .is_some_and(|(end, _)| *end <= written)
        {
            if let Some((_, reply)) = self.sent_waiters.pop_front() {
                self.shared.metrics.downlink(Downlink::Sent);
                self.reply_delivery(reply, DeliveryStatus::Sent, 0, None);
            }
        }
    }

    async fn on_bus_message(&mut self, msg: Msg) -> Result<(), End> {
        match control_op(&msg) {
            None => self.on_downlink(msg),
            Some(Ok(ControlOp::Presence)) => {
                if let Some(reply) = msg.reply {
                    self.reply(reply, json_bytes(&self.presence_info()));
                }
                Ok(())
            }
            Some(Ok(ControlOp::Kick)) => {
                tracing::info!(device_id = %self.id, session = %self.session, "kicked");
                let end = Box::pin(self.release(GoAwayReason::Kicked)).await;
                if let Some(reply) = msg.reply {
                    self.reply(reply, json_bytes(&self.kicked()));
                }
                Err(end)
            }
            // A welcomed holder always yields to a login: the claimant logged in later.
            Some(Ok(ControlOp::Claim)) => Err(Box::pin(self.yield_to(msg.reply)).await),
            Some(Ok(ControlOp::Reclaim)) => Box::pin(self.on_reclaim(msg)).await,
            Some(Err(unknown)) => {
                if let Some(reply) = msg.reply {
                    let body = json_bytes(&crate::contract::ControlError {
                        error: "bad_request".into(),
                        message: format!("unknown {} value {unknown:?}", headers::CONTROL),
                    });
                    self.reply(reply, body);
                }
                Ok(())
            }
        }
    }

    /// Gives the device up to a claimant and tells it so once this session has let go.
    async fn yield_to(&mut self, reply: Option<Bytes>) -> End {
        let end = Box::pin(self.release(GoAwayReason::Replaced)).await;
        if let Some(reply) = reply {
            self.reply(reply, json_bytes(&self.released(true)));
        }
        end
    }

    /// Another welcomed session of this device re-asserts its claim (its gateway lost NATS
    /// for a while, and both sessions are subscribed now): the older of the two yields. If the
    /// claimant is older it hears `superseded` and this session carries on.
    async fn on_reclaim(&mut self, msg: Msg) -> Result<(), End> {
        let claim = match serde_json::from_slice::<ClaimRequest>(&msg.payload) {
            Ok(claim) => claim,
            Err(error) => {
                if let Some(reply) = msg.reply {
                    self.reply(reply, unreadable_claim(&error));
                }
                return Ok(());
            }
        };
        // Without a login time here this session is already ending (a newer local login
        // replaces it).
        let own = self
            .shared
            .registry
            .login_ns(&self.id, &self.session)
            .map(|login_ns| ClaimKey {
                login_ns,
                gateway: self.shared.instance.clone(),
                session: self.session.clone(),
            });
        match own {
            // This session's own reclaim, republished back to it by another gateway's hand-off:
            // nothing to decide, and the real holder (if any) answers the reclaimer.
            Some(own) if claim.key == own => Ok(()),
            Some(own) if claim.key < own => {
                tracing::info!(device_id = %self.id, session = %self.session, older = %claim.key.session, "an older session of this device re-asserted its claim; it yields");
                if let Some(reply) = msg.reply {
                    self.reply(reply, json_bytes(&ClaimReply::Superseded { key: own }));
                }
                Ok(())
            }
            Some(_) => {
                tracing::warn!(device_id = %self.id, session = %self.session, newer = %claim.key.session, "a newer session of this device re-asserted its claim (its gateway reconnected, or a NATS partition healed); yielding");
                // Unless this gateway's own reclaim lost first (and counted).
                if self.shared.registry.lose(&self.id, &self.session) {
                    self.shared.metrics.reclaims_lost.inc();
                }
                Err(self.yield_to(msg.reply).await)
            }
            None => Err(self.yield_to(msg.reply).await),
        }
    }

    /// A message for the device. Every request gets exactly one reply; a plain publish that
    /// cannot be delivered is counted and, when the queue overflows, closes the session.
    fn on_downlink(&mut self, msg: Msg) -> Result<(), End> {
        let payload_limit = crate::codec::max_down_payload_len(self.shared.codec.max_frame_len());
        if msg.payload.len() > payload_limit {
            let reason = format!(
                "too_large: payload of {} bytes exceeds {payload_limit}",
                msg.payload.len()
            );
            match msg.reply {
                Some(reply) => {
                    self.shared.metrics.downlink(Downlink::Failed);
                    self.reply_delivery(reply, DeliveryStatus::Failed, 0, Some("too_large"));
                }
                None => self.shared.metrics.downlink(Downlink::Dropped),
            }
            tracing::warn!(device_id = %self.id, %reason, "downlink refused");
            return Ok(());
        }
        let wire_len = 9 + msg.payload.len();
        let queue_full =
            self.conn.writer.pending() + wire_len > self.shared.config.session_queue_bytes;
        let wants_device_ack =
            msg.reply.is_some() && msg.header(headers::ACK) == Some(headers::ACK_DEVICE);
        let acks_full = wants_device_ack && self.acks.len() >= self.shared.config.max_inflight;
        if queue_full || acks_full {
            return match msg.reply {
                Some(reply) => {
                    self.shared.metrics.downlink(Downlink::Busy);
                    let why = if queue_full {
                        "queue_full"
                    } else {
                        "too_many_unacked"
                    };
                    self.reply_delivery(reply, DeliveryStatus::Busy, 0, Some(why));
                    Ok(())
                }
                None => {
                    self.shared.metrics.downlink(Downlink::Dropped);
                    Err(End::Error(Refusal::new(
                        ErrorCode::SlowConsumer,
                        format!(
                            "more than {} bytes of downlink queued; the device is not reading",
                            self.shared.config.session_queue_bytes
                        ),
                    )))
                }
            };
        }
        let seq = if wants_device_ack {
            self.allocate_seq()
        } else {
            0
        };
        self.send(Frame::Down {
            seq,
            payload: msg.payload,
        })?;
        if let Some(reply) = msg.reply {
            if wants_device_ack {
                self.acks.insert(seq, reply);
                self.ack_deadlines.push_back((
                    seq,
                    Instant::now() + Duration::from_millis(self.shared.config.ack_timeout_ms),
                ));
            } else {
                let end = self.conn.writer.written() + self.conn.writer.pending() as u64;
                self.sent_waiters.push_back((end, reply));
            }
        } else {
            self.shared.metrics.downlink(Downlink::Sent);
        }
        Ok(())
    }

    fn allocate_seq(&mut self) -> u32 {
        loop {
            self.next_seq = self.next_seq.wrapping_add(1);
            if self.next_seq != 0 && !self.acks.contains_key(&self.next_seq) {
                return self.next_seq;
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), End> {
        let wire_len = frame.wire_len();
        self.shared.metrics.frame_in(frame.kind(), wire_len);
        let now = Instant::now();
        self.last_frame = now;
        match frame {
            Frame::Up { seq, payload } => {
                if self.up_bucket.take(&self.shared.config, now, wire_len) {
                    self.shared.metrics.uplink_throttled.inc();
                    tracing::debug!(device_id = %self.id, session = %self.session, "uplink over its rate; reading paused");
                }
                let epoch = self.shared.bus.epoch();
                let [device, session, gateway] = self.identity_headers();
                let mut seq_text = itoa::Buffer::new();
                let with_seq = [
                    device,
                    session,
                    gateway,
                    (headers::SEQ, seq_text.format(seq)),
                ];
                let headers = if seq == 0 {
                    &with_seq[..3]
                } else {
                    &with_seq[..]
                };
                let published = self
                    .shared
                    .bus
                    .link()
                    .publish(self.up.as_bytes(), None, Headers::Pairs(headers), &payload)
                    .await;
                match published {
                    Ok(()) => {}
                    Err(LinkError::TooLarge { len, max }) => {
                        return Err(End::Error(Refusal::new(
                            ErrorCode::FrameTooLarge,
                            format!("UP of {len} bytes exceeds the message bus limit of {max}"),
                        )));
                    }
                    Err(error) => {
                        // NATS dropped this very moment (reading stops as the session sees it):
                        // no ACK for this UP, so a device that asked for one resends it; a
                        // plain one is lost.
                        self.shared.metrics.uplink(if seq == 0 {
                            Uplink::Dropped
                        } else {
                            Uplink::Unconfirmed
                        });
                        tracing::debug!(device_id = %self.id, seq, %error, "uplink not handed to NATS");
                        return Ok(());
                    }
                }
                self.shared.metrics.uplink(Uplink::Published);
                if seq != 0 {
                    let rx = self.shared.bus.confirm(epoch);
                    self.uplink.push_back((seq, rx));
                }
                Ok(())
            }
            Frame::Ack(seq) => {
                if let Some(reply) = self.acks.remove(&seq) {
                    self.shared.metrics.downlink(Downlink::Acked);
                    self.reply_delivery(reply, DeliveryStatus::Acked, seq, None);
                }
                Ok(())
            }
            Frame::Ping(body) => self.send(Frame::Pong(body)),
            Frame::Pong(_) => Ok(()),
            Frame::Hello(_) => Err(End::Error(Refusal::new(
                ErrorCode::ProtocolViolation,
                "second HELLO on a logged-in session",
            ))),
            other => Err(End::Error(Refusal::new(
                ErrorCode::ProtocolViolation,
                format!(
                    "{} is a gateway-to-device frame",
                    other.name().to_uppercase()
                ),
            ))),
        }
    }

    /// Due deadlines. `bus_up`: NATS as this turn of the loop saw it. The idle check needs NATS
    /// up then and now: NATS coming back while the loop waited has not restarted the idle clock
    /// yet (the next turn does), so the outage must not count against the device.
    fn on_timer(&mut self, bus_up: bool) -> Result<(), End> {
        let now = Instant::now();
        while let Some(&(seq, deadline)) = self.ack_deadlines.front() {
            if deadline > now {
                break;
            }
            self.ack_deadlines.pop_front();
            if let Some(reply) = self.acks.remove(&seq) {
                self.shared.metrics.downlink(Downlink::Timeout);
                self.reply_delivery(
                    reply,
                    DeliveryStatus::Timeout,
                    seq,
                    Some("device_did_not_ack"),
                );
            }
        }
        if bus_up && self.shared.bus.is_connected() && now >= self.last_frame + self.idle_limit() {
            return Err(End::Error(Refusal::new(
                ErrorCode::IdleTimeout,
                format!("no frame for {} s", self.idle_limit().as_secs()),
            )));
        }
        let write_limit = Duration::from_millis(self.shared.config.write_timeout_ms);
        if self.conn.write_pending() && now >= self.last_write + write_limit {
            return Err(End::Error(Refusal::new(
                ErrorCode::SlowConsumer,
                format!("no write progress for {} ms", write_limit.as_millis()),
            )));
        }
        Ok(())
    }

    async fn release(&mut self, reason: GoAwayReason) -> End {
        self.release_with(reason, None).await
    }

    /// Gives the device up: stop NATS routing (confirmed by the server), deliver what was
    /// already routed here, write it all with the GOAWAY, then close.
    async fn release_with(&mut self, reason: GoAwayReason, reconnect_after_ms: Option<u64>) -> End {
        self.shared.registry.ending(&self.id, &self.session);
        let limit = Duration::from_millis(self.shared.config.claim_timeout_ms);
        if let Err(e) = self.sub.drain(limit).await {
            tracing::warn!(device_id = %self.id, error = %e, "could not confirm the unsubscription");
        }
        while let Some(msg) = self.sub.try_next() {
            match control_op(&msg) {
                // Already letting go: further claims and kicks just hear so.
                Some(Ok(ControlOp::Claim | ControlOp::Reclaim)) => {
                    if let Some(reply) = msg.reply {
                        self.reply(reply, json_bytes(&self.released(false)));
                    }
                }
                Some(Ok(ControlOp::Kick)) => {
                    if let Some(reply) = msg.reply {
                        self.reply(reply, json_bytes(&self.kicked()));
                    }
                }
                Some(Ok(ControlOp::Presence)) => {
                    if let Some(reply) = msg.reply {
                        self.reply(reply, json_bytes(&self.presence_info()));
                    }
                }
                // An unknown operation hears what any request left behind hears.
                Some(Err(_)) => self.undeliverable(msg),
                None => {
                    // Overflow here ends the session anyway; what matters is every request
                    // still gets its answer, which `on_downlink` guarantees.
                    let _ = self.on_downlink(msg);
                }
            }
        }
        let mut frame = goaway_frame(&self.shared, reason);
        if let Some(ms) = reconnect_after_ms {
            frame = Frame::json(
                Frame::GoAway,
                &GoAway {
                    reason,
                    reconnect_after_ms: ms,
                },
            );
        }
        let _ = self.send(frame);
        let write_limit = LAST_WORDS.max(Duration::from_millis(100));
        let _ = tokio::time::timeout(write_limit, self.conn.flush()).await;
        self.resolve_sent();
        let _ = tokio::time::timeout(write_limit, self.conn.stream.shutdown()).await;
        End::GoAway(reason)
    }

    /// Ends the session: answer every open request, unregister, announce the disconnect.
    async fn finish(mut self, end: End) {
        if let End::Error(r) = &end {
            self.shared.metrics.error(r.code);
            tracing::info!(device_id = %self.id, session = %self.session, code = r.code.as_str(), message = %r.message, "closing session");
            let frame = r.frame();
            self.shared
                .metrics
                .frame_out(frame.kind(), frame.wire_len());
            self.conn.close_with(Some(frame), LAST_WORDS).await;
            self.resolve_sent();
        }
        self.shared.registry.ending(&self.id, &self.session);
        // Drained, not just unsubscribed: messages NATS routed here before it saw the UNSUB
        // are still on their way, and each request among them must hear `session_closed`
        // below instead of waiting out its timeout. (After a release this is already done.)
        let limit = Duration::from_millis(self.shared.config.claim_timeout_ms);
        if let Err(e) = self.sub.drain(limit).await {
            tracing::debug!(device_id = %self.id, error = %e, "could not confirm the unsubscription");
        }
        let reason = end.reason();
        if let End::Io(error) = &end {
            tracing::debug!(device_id = %self.id, %error, "device socket failed");
        }
        // Whatever was routed here and not written can no longer be delivered.
        while let Some(msg) = self.sub.try_next() {
            self.undeliverable(msg);
        }
        for (_, reply) in std::mem::take(&mut self.sent_waiters) {
            self.shared.metrics.downlink(Downlink::Failed);
            self.reply_delivery(reply, DeliveryStatus::Failed, 0, Some("session_closed"));
        }
        for (seq, reply) in std::mem::take(&mut self.acks) {
            self.shared.metrics.downlink(Downlink::Failed);
            self.reply_delivery(
                reply,
                DeliveryStatus::Failed,
                seq,
                Some("session_closed_before_ack"),
            );
        }
        self.shared.registry.remove(&self.id, &self.session);
        self.shared.metrics.sessions.dec();
        self.presence(PresenceEventKind::Disconnected, Some(reason.clone()));
        tracing::info!(device_id = %self.id, session = %self.session, reason = %reason, "device disconnected");
    }

    /// See [`undeliverable`].
    fn undeliverable(&self, msg: Msg) {
        undeliverable(&self.shared, &self.session, msg);
    }

    fn presence(&self, event: PresenceEventKind, reason: Option<String>) {
        let body = json_bytes(&PresenceEvent {
            event,
            device_id: self.id.clone(),
            gateway: self.shared.instance.clone(),
            session: self.session.clone(),
            at_ms: unix_ms(),
            remote_addr: self.remote_addr.clone(),
            reason,
        });
        let subject = subjects::presence_events(&self.id);
        let headers = self.identity_headers();
        if let Err(error) = self.shared.bus.link().publish_now(
            subject.as_bytes(),
            None,
            Headers::Pairs(&headers),
            &body,
        ) {
            tracing::debug!(device_id = %self.id, %error, "presence event not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_id_is_quoted_back_only_in_part() {
        assert_eq!(quoted_prefix("a.b"), r#""a.b""#);
        let long = "é".repeat(100);
        let shown = quoted_prefix(&long);
        assert!(
            shown.starts_with(&format!("{:?}", "é".repeat(64))),
            "{shown}"
        );
        assert!(shown.ends_with("... (200 bytes)"), "{shown}");
    }

    fn size3<A, B, C, F: Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn size4<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_uplink_bucket_allows_the_burst_then_the_rate() {
        let config = crate::config::Config {
            up_rate_msgs: 10,
            up_burst_ms: 500,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut b = UpBucket::full(&config, t0);
        let mut taken = 0;
        while !b.throttled(&config) {
            b.take(&config, t0, 10);
            taken += 1;
        }
        assert_eq!(taken, 6, "burst of 5, plus the one that overdraws");
        let ready = b.ready_at(&config);
        assert!(ready > t0 + Duration::from_millis(99) && ready < t0 + Duration::from_millis(101));
        b.refill(&config, ready);
        assert!(b.ready());
    }

    #[test]
    fn replies_to_devgate_subjects_are_refused_except_the_gateway_inbox() {
        for ok in [
            &b"_INBOX.abc.1"[..],
            b"my.custom.inbox.7",
            b"devgate.inbox.x1.2",
            b"devices.x",
        ] {
            assert!(reply_allowed(ok), "{}", String::from_utf8_lossy(ok));
        }
        for forged in [
            &b"device.victim.up"[..],
            b"device.victim.presence",
            b"device.victim.down",
            b"devgate.gateway.announce",
            b"devgate.gateways.stats",
            b"devgate.inbox",
        ] {
            assert!(
                !reply_allowed(forged),
                "{}",
                String::from_utf8_lossy(forged)
            );
        }
    }

    fn size2<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connected device costs one session task; its size is memory per idle device.
    /// Sizes are fixed at compile time, so a budget catches a regression deterministically
    /// (the RSS per session it adds up to is measured by `devgate-bench`, see BENCHMARKS.md).
    #[test]
    fn session_futures_stay_within_their_memory_budget() {
        let task = size4(serve);
        let session = size2(live);
        let greeting = size3(|s: Arc<Shared>, t: TcpStream, p: SocketAddr| async move {
            greet_in_slot(&s, t, p).await
        });
        eprintln!("serve {task} B, live {session} B, greet {greeting} B");
        // 2026-11-30: serve 104 B, live 1648 B (debug, rustc 1.95).
        assert!(task <= 256, "the spawned task's future grew to {task} B");
        assert!(
            session <= 2048,
            "the live session future grew to {session} B"
        );
    }
}
