//! Turns a desired set into the text of an nginx `stream { }` include. Pure and deterministic:
//! the same set and settings always give the same bytes, so the controller can compare texts
//! and skip reloads that would change nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::endpoints::DesiredSet;

/// Zone memory budgeted per upstream server. The zone holds the upstream's run-time state:
/// with it every nginx worker sees the same connection counts, which is what makes `least_conn`
/// balance across workers instead of per worker. It must hold every server, or nginx refuses
/// the whole configuration (`ngx_slab_alloc() failed: no memory in upstream zone`), so a
/// fixed size (the 64k lb-sync once rendered held 63 or 64 servers) freezes the upstream as
/// soon as the fleet outgrows it.
///
/// Measured with `nginx -t` (nginx 1.22.1, Debian, built `--with-compat`): a server costs four
/// slab allocations in the zone, its peer (a 512-byte slot), its sockaddr and its name (128
/// each) and its `server` text (16 to 64), 788 bytes for IPv4 and up to 835 for the longest
/// IPv6 address with the slab's page overhead (1000 servers: 780k IPv4, 828k IPv6; 5000: 3860k
/// and 4100k). 2 KiB is 2.4 times that, so a later nginx whose peer grows into the next slab
/// slot (1024 bytes, about 1.3 KiB a server) still fits. Zone memory nobody writes is never
/// touched, so the over-provisioning costs address space, not RAM.
pub const ZONE_BYTES_PER_SERVER: u64 = 2048;

/// Zone memory besides the servers: the slab pool's header and a first page per slot size.
/// nginx refuses a zone under 8 pages ("zone is too small"), 32k with 4k pages; 32k holds 16
/// to 24 servers (measured), the rest goes to pages that each slot size takes for itself.
pub const ZONE_BASE_BYTES: u64 = 32 * 1024;

/// Default least zone size (`--upstream-zone-min-size`): the fixed 64k lb-sync rendered before
/// it sized the zone, so the text for up to 16 servers stays byte for byte what it was, and an
/// upgrade reloads no nginx that had nothing to gain.
pub const DEFAULT_ZONE_MIN_BYTES: u64 = 64 * 1024;

/// The upstream zone size for `servers` servers (the `down` placeholder counts as one): the
/// [`ZONE_BASE_BYTES`] plus [`ZONE_BYTES_PER_SERVER`] for each, rounded up to a power of two,
/// and at least `min_bytes`.
///
/// Sized from the count, because no fixed size is both small for ten gateways and enough for
/// thousands, and an operator cannot be expected to resize it as the fleet grows. nginx
/// creates a fresh upstream zone at every reload (upstream zones are never reused across
/// configurations), so a changed size reloads like any other change: tested with nginx 1.22.1
/// going from 64k to 1m and back, connections held open by old workers keep working, and
/// "conflicts with already declared size" only concerns two `zone` lines of one
/// configuration. The power-of-two steps keep the line unchanged while the fleet moves within
/// a step, so a diff of the rendered file shows the servers that changed, and leave at least
/// the budget's headroom right after each step.
pub fn zone_size(servers: usize, min_bytes: u64) -> u64 {
    let servers = u64::try_from(servers.max(1)).unwrap_or(u64::MAX);
    let need = servers
        .saturating_mul(ZONE_BYTES_PER_SERVER)
        .saturating_add(ZONE_BASE_BYTES);
    need.checked_next_power_of_two()
        .unwrap_or(need)
        .max(min_bytes)
}

/// `bytes` as an nginx size: `m` or `k` when it divides evenly, else plain bytes.
pub fn nginx_size(bytes: u64) -> String {
    const K: u64 = 1024;
    const M: u64 = 1024 * 1024;
    if bytes >= M && bytes.is_multiple_of(M) {
        format!("{}m", bytes / M)
    } else if bytes >= K && bytes.is_multiple_of(K) {
        format!("{}k", bytes / K)
    } else {
        bytes.to_string()
    }
}

/// Whether nginx's output says the upstream zone could not hold the configuration: out of
/// memory while copying the servers in, or a zone under nginx's minimum of 8 pages (a system
/// with 64k pages needs 512k).
pub fn zone_exhausted(nginx_output: &str) -> bool {
    nginx_output.lines().any(|line| {
        line.contains("no memory in upstream zone")
            || line
                .split_once("zone \"")
                .is_some_and(|(_, rest)| rest.contains("\" is too small"))
    })
}

/// Destination of the placeholder server rendered when no instance is ready. nginx refuses an
/// upstream without servers, so the empty set renders this one server marked `down`: the
/// configuration stays valid and new device connections are refused at once (devices back off
/// and retry) until an instance is ready.
pub const PLACEHOLDER: &str = "127.0.0.1:1";

/// Everything besides the server list that shapes the rendered text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderSettings {
    /// Upstream (and zone) name.
    pub upstream_name: String,
    /// Least size of the upstream zone, bytes; larger sets get more ([`zone_size`]).
    pub zone_min_bytes: u64,
    /// Address nginx listens on for devices.
    pub listen: SocketAddr,
    /// Send a PROXY protocol header to the gateways so they see the device's real address.
    pub proxy_protocol: bool,
    /// nginx `proxy_timeout`: idle time after which nginx closes a device connection. Must exceed
    /// the gateway's own idle timeout (3 heartbeats of 30 s) or nginx would cut healthy, quiet
    /// devices.
    pub proxy_timeout_s: u64,
    /// nginx `proxy_connect_timeout` towards a gateway; short, so a dead instance costs a device
    /// little before nginx tries the next one.
    pub proxy_connect_timeout_s: u64,
    /// nginx `proxy_buffer_size`: the buffer for each direction of a proxied connection. Device
    /// messages are small and connections many; with TLS the buffer is filled on every read, so
    /// nginx's 16k default costs 13 KB more per idle TLS device than 4k (measured, BENCHMARKS.md).
    pub proxy_buffer_size: String,
    /// nginx `max_fails`: failed connects within `fail_timeout` before a server is skipped.
    pub max_fails: u32,
    /// nginx `fail_timeout`, seconds.
    pub fail_timeout_s: u64,
    /// TLS for devices, terminated by nginx; `None`: the listener is plain (devices' TLS
    /// passes through, or there is none).
    pub tls: Option<TlsSettings>,
    /// With `tls` `None`: the devices' TLS passes through to the gateways. The listener is plain
    /// either way; a comment says why, so nobody reading the nginx config takes the missing
    /// `ssl` for a mistake and "fixes" it by terminating TLS, which would break the gateways'
    /// binding of client certificates to device ids. Validation refuses it together with `tls`.
    pub tls_passthrough: bool,
}

/// How nginx terminates the devices' TLS. nginx reads the files itself; lb-sync only names them
/// and notices when their contents change (cert-manager renews a certificate in place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain nginx presents to devices.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// PEM CAs that sign device certificates: when set, a device must present one (mutual
    /// TLS) on top of its token.
    pub client_ca: Option<PathBuf>,
    /// `ssl_verify_depth` with a client CA: how many CAs may sit between a device certificate
    /// and the CA given. nginx's default, 1, refuses a device certificate from an issuing CA
    /// under an intermediate, a common PKI layout.
    pub verify_depth: u32,
    /// `ssl_protocols`, e.g. `["TLSv1.2", "TLSv1.3"]`.
    pub protocols: Vec<String>,
    /// `ssl_handshake_timeout`, seconds: how long a connection may take to finish its
    /// handshake before nginx drops it (nginx's own default, 60 s, lets a slow-handshake flood
    /// hold many sockets).
    pub handshake_timeout_s: u64,
    /// Size of the shared TLS session cache (`ssl_session_cache shared:..:SIZE`, about 4,000
    /// sessions per megabyte): resumed handshakes skip the certificate exchange, which is most
    /// of a reconnect storm's TLS cost.
    pub session_cache: String,
    /// `ssl_session_timeout`, seconds: how long a device may resume its session.
    pub session_timeout_s: u64,
    /// Hash of the files' contents as last read. It is part of the rendered text, so renewed
    /// files change the text, and the controller applies (and nginx reloads) as for any other
    /// change.
    pub fingerprint: String,
}

impl Default for RenderSettings {
    fn default() -> Self {
        RenderSettings {
            upstream_name: "devgate_gateways".into(),
            zone_min_bytes: DEFAULT_ZONE_MIN_BYTES,
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            proxy_protocol: false,
            proxy_timeout_s: 120,
            proxy_connect_timeout_s: 2,
            proxy_buffer_size: "4k".into(),
            max_fails: 3,
            fail_timeout_s: 10,
            tls: None,
            tls_passthrough: false,
        }
    }
}

/// Renders the upstream and the device-facing `server` block.
pub fn render(set: &DesiredSet, s: &RenderSettings) -> String {
    let mut out = String::new();
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        out,
        "# Generated by devgate-lb-sync: the ready gateway instances. Do not edit; it is\n\
         # rewritten whenever the set changes."
    );
    let name = &s.upstream_name;
    let _ = writeln!(out, "upstream {name} {{");
    let zone = nginx_size(zone_size(set.len(), s.zone_min_bytes));
    let _ = writeln!(out, "    zone {name} {zone};");
    let _ = writeln!(out, "    least_conn;");
    if set.is_empty() {
        let _ = writeln!(
            out,
            "    # No gateway instance is ready. nginx refuses an empty upstream, so this\n    \
             # placeholder (marked down) keeps the configuration valid; new device\n    \
             # connections are refused until an instance is ready."
        );
        let _ = writeln!(out, "    server {PLACEHOLDER} down;");
    }
    for (addr, weight) in set.servers() {
        let _ = write!(out, "    server {addr}");
        if let Some(w) = weight {
            let _ = write!(out, " weight={w}");
        }
        let _ = writeln!(
            out,
            " max_fails={} fail_timeout={}s;",
            s.max_fails, s.fail_timeout_s
        );
    }
    let _ = writeln!(out, "}}");
    let _ = writeln!(out);
    let _ = writeln!(out, "server {{");
    match &s.tls {
        None => {
            let _ = writeln!(out, "    listen {};", s.listen);
            if s.tls_passthrough {
                let _ = writeln!(
                    out,
                    "    # No ssl: device TLS passes through to the gateways (--device-tls-cert)."
                );
            }
        }
        Some(tls) => render_tls(&mut out, s.listen, name, tls),
    }
    let _ = writeln!(out, "    proxy_pass {name};");
    if s.proxy_protocol {
        let _ = writeln!(out, "    proxy_protocol on;");
    }
    let _ = writeln!(
        out,
        "    proxy_connect_timeout {}s;",
        s.proxy_connect_timeout_s
    );
    let _ = writeln!(out, "    proxy_timeout {}s;", s.proxy_timeout_s);
    let _ = writeln!(out, "    proxy_buffer_size {};", s.proxy_buffer_size);
    let _ = writeln!(out, "}}");
    out
}

impl TlsSettings {
    /// The files nginx reads, in a fixed order (what the fingerprint hashes).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_ca.clone());
        files
    }
}

/// The `listen ... ssl` line and the `ssl_*` directives of the device-facing server.
fn render_tls(out: &mut String, listen: SocketAddr, name: &str, tls: &TlsSettings) {
    let _ = writeln!(out, "    listen {listen} ssl;");
    let _ = writeln!(
        out,
        "    # TLS for devices ends here. Files' sha256 {}: renewed files change this line,\n    \
         # and nginx reloads with them.",
        tls.fingerprint
    );
    let _ = writeln!(out, "    ssl_certificate {};", tls.cert.display());
    let _ = writeln!(out, "    ssl_certificate_key {};", tls.key.display());
    let _ = writeln!(out, "    ssl_protocols {};", tls.protocols.join(" "));
    let _ = writeln!(
        out,
        "    ssl_session_cache shared:{name}_tls:{};",
        tls.session_cache
    );
    let _ = writeln!(out, "    ssl_session_timeout {}s;", tls.session_timeout_s);
    let _ = writeln!(
        out,
        "    ssl_handshake_timeout {}s;",
        tls.handshake_timeout_s
    );
    if let Some(ca) = &tls.client_ca {
        let _ = writeln!(out, "    ssl_verify_client on;");
        let _ = writeln!(out, "    ssl_client_certificate {};", ca.display());
        let _ = writeln!(out, "    ssl_verify_depth {};", tls.verify_depth);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::endpoints::{Endpoint, EndpointState};

    /// Compares with `tests/golden/<name>`; `UPDATE_GOLDEN=1 cargo test` rewrites the files.
    fn golden(name: &str, actual: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).expect("write golden file");
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
        assert_eq!(actual, expected, "{} differs", path.display());
    }

    fn ep(addr: &str, state: EndpointState, weight: Option<u32>) -> Endpoint {
        Endpoint {
            addr: addr.parse().expect("test addr"),
            state,
            weight,
        }
    }

    fn three() -> Vec<Endpoint> {
        vec![
            ep("10.0.0.12:7000", EndpointState::Ready, None),
            ep("10.0.0.2:7000", EndpointState::Ready, Some(2)),
            ep("10.0.0.7:7000", EndpointState::Terminating, None),
            ep("[fd00::5]:7000", EndpointState::Ready, None),
            ep("10.0.0.9:7000", EndpointState::NotReady, None),
        ]
    }

    #[test]
    fn renders_ready_servers_in_stable_order() {
        let text = render(
            &DesiredSet::from_endpoints(&three()),
            &RenderSettings::default(),
        );
        golden("three_ready.conf", &text);
    }

    #[test]
    fn same_set_in_any_order_renders_the_same_bytes() {
        let mut eps = three();
        let a = render(
            &DesiredSet::from_endpoints(&eps),
            &RenderSettings::default(),
        );
        eps.reverse();
        let b = render(
            &DesiredSet::from_endpoints(&eps),
            &RenderSettings::default(),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn empty_set_renders_a_down_placeholder() {
        let text = render(&DesiredSet::default(), &RenderSettings::default());
        assert!(text.contains("server 127.0.0.1:1 down;"), "{text}");
        golden("empty.conf", &text);
    }

    #[test]
    fn settings_shape_the_server_block() {
        let settings = RenderSettings {
            upstream_name: "edge".into(),
            zone_min_bytes: DEFAULT_ZONE_MIN_BYTES,
            listen: "127.0.0.1:17000".parse().expect("addr"),
            proxy_protocol: true,
            proxy_timeout_s: 300,
            proxy_connect_timeout_s: 1,
            proxy_buffer_size: "8k".into(),
            max_fails: 1,
            fail_timeout_s: 5,
            tls: None,
            tls_passthrough: false,
        };
        let set = DesiredSet::from_endpoints(&[ep("127.0.0.1:7001", EndpointState::Ready, None)]);
        golden("proxy_protocol.conf", &render(&set, &settings));
    }

    fn tls(client_ca: Option<&str>) -> TlsSettings {
        TlsSettings {
            cert: "/etc/devgate-device-tls/tls.crt".into(),
            key: "/etc/devgate-device-tls/tls.key".into(),
            client_ca: client_ca.map(PathBuf::from),
            verify_depth: 3,
            protocols: vec!["TLSv1.2".into(), "TLSv1.3".into()],
            handshake_timeout_s: 15,
            session_cache: "10m".into(),
            session_timeout_s: 3600,
            fingerprint: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn tls_terminates_at_the_listener() {
        let settings = RenderSettings {
            proxy_protocol: true,
            tls: Some(tls(None)),
            ..RenderSettings::default()
        };
        let set = DesiredSet::from_endpoints(&[ep("10.0.0.2:7000", EndpointState::Ready, None)]);
        let text = render(&set, &settings);
        golden("tls.conf", &text);
        assert!(!text.contains("ssl_verify_client"), "{text}");
    }

    #[test]
    fn a_client_ca_makes_devices_present_certificates() {
        let settings = RenderSettings {
            tls: Some(tls(Some("/etc/devgate-device-ca/ca.crt"))),
            ..RenderSettings::default()
        };
        golden(
            "tls_client_ca.conf",
            &render(&DesiredSet::default(), &settings),
        );
    }

    #[test]
    fn passed_through_tls_leaves_the_listener_plain_and_says_why() {
        let settings = RenderSettings {
            proxy_protocol: true,
            tls_passthrough: true,
            ..RenderSettings::default()
        };
        let set = DesiredSet::from_endpoints(&[ep("10.0.0.2:7000", EndpointState::Ready, None)]);
        let text = render(&set, &settings);
        golden("tls_passthrough.conf", &text);
        assert!(!text.contains("ssl;") && !text.contains("ssl_"), "{text}");
        assert!(
            text.contains("device TLS passes through to the gateways"),
            "{text}"
        );
        let plain = render(
            &set,
            &RenderSettings {
                tls_passthrough: false,
                ..settings
            },
        );
        assert!(!plain.contains("passes through"), "{plain}");
    }

    #[test]
    fn new_tls_files_render_new_text() {
        let mut renewed = tls(None);
        renewed.fingerprint = "fedcba9876543210".into();
        let text = |t: TlsSettings| {
            render(
                &DesiredSet::default(),
                &RenderSettings {
                    tls: Some(t),
                    ..RenderSettings::default()
                },
            )
        };
        assert_ne!(text(tls(None)), text(renewed));
    }

    #[test]
    fn the_zone_grows_with_the_set_in_powers_of_two() {
        const K: u64 = 1024;
        let min = DEFAULT_ZONE_MIN_BYTES;
        // (servers, zone): 2 KiB a server and 32 KiB more, rounded up to a power of two.
        for (servers, zone) in [
            (0, 64 * K),
            (1, 64 * K),
            (16, 64 * K),
            (17, 128 * K),
            (64, 256 * K),
            (65, 256 * K),
            (100, 256 * K),
            (500, 2048 * K),
            (1000, 2048 * K),
            (2000, 4096 * K),
            (5000, 16384 * K),
        ] {
            assert_eq!(zone_size(servers, min), zone, "{servers} servers");
        }
        for servers in [1, 10, 100, 1000, 10_000, 100_000] {
            let zone = zone_size(servers, min);
            assert!(zone.is_power_of_two(), "{servers}: {zone}");
            // At least the budget: 2.4 times the most nginx 1.22 was measured to need.
            assert!(
                zone >= ZONE_BASE_BYTES + servers as u64 * ZONE_BYTES_PER_SERVER,
                "{servers}: {zone}"
            );
            assert!(zone >= ZONE_BASE_BYTES + servers as u64 * 835);
        }
        // The floor wins while it is larger; the count wins beyond it.
        assert_eq!(zone_size(10, 3 * 1024 * K), 3 * 1024 * K);
        assert_eq!(zone_size(2000, 3 * 1024 * K), 4096 * K);
        assert_eq!(
            zone_size(usize::MAX, min),
            u64::MAX,
            "saturates, no overflow"
        );
    }

    #[test]
    fn zone_sizes_are_written_as_nginx_sizes() {
        assert_eq!(nginx_size(64 * 1024), "64k");
        assert_eq!(nginx_size(512 * 1024), "512k");
        assert_eq!(nginx_size(1024 * 1024), "1m");
        assert_eq!(nginx_size(16 * 1024 * 1024), "16m");
        assert_eq!(nginx_size(1536 * 1024), "1536k");
        assert_eq!(nginx_size(1000), "1000");
    }

    #[test]
    fn nginx_refusals_for_lack_of_zone_memory_are_recognised() {
        assert!(zone_exhausted(
            "nginx: [crit] ngx_slab_alloc() failed: no memory in upstream zone \"devgate_gateways\""
        ));
        assert!(zone_exhausted(
            "nginx: [emerg] zone \"devgate_gateways\" is too small in /etc/nginx/stream.d/x.conf:4"
        ));
        assert!(!zone_exhausted(
            "nginx: [emerg] duplicate upstream \"devgate_gateways\" in /etc/nginx/x.conf:3"
        ));
    }

    #[test]
    fn a_set_beyond_the_old_64k_gets_a_larger_zone() {
        // 100 servers, half IPv6: more than the 64 that 64k held (golden checked by nginx -t in
        // tests/nginx_static.rs).
        let eps: Vec<_> = (0..50u16)
            .flat_map(|i| {
                [
                    ep(
                        &format!("10.0.{}.{}:7000", i / 250, i % 250 + 1),
                        EndpointState::Ready,
                        None,
                    ),
                    ep(
                        &format!("[fd00::{:x}]:7000", i + 1),
                        EndpointState::Ready,
                        None,
                    ),
                ]
            })
            .collect();
        let text = render(
            &DesiredSet::from_endpoints(&eps),
            &RenderSettings::default(),
        );
        assert!(text.contains("    zone devgate_gateways 256k;\n"), "{text}");
        golden("hundred_servers.conf", &text);
    }

    #[test]
    fn proxy_protocol_is_off_unless_asked() {
        let text = render(&DesiredSet::default(), &RenderSettings::default());
        assert!(!text.contains("proxy_protocol"), "{text}");
    }
}
