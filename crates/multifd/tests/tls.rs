//! TLS on every connection, us to us: x509 (verified both ways, the
//! certificate checked against the URI's host or an override, client
//! distinguished names authorized or not, anonymous clients rejected) and
//! PSK (with the `tls-psk` feature). A rejected peer fails both sides with
//! a typed error, in bounded time, with nothing left behind; an accepted
//! one migrates every page, with every method.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use multifd::{
    Compression, Error, GuestRam, MethodConfig, MigrationConfig, Progress, ReceiveOptions,
    SourceOptions, StaticRam, TlsClient, TlsServer, migrate,
};
use util::*;

fn config(channels: u8, compression: Compression) -> MigrationConfig {
    MigrationConfig {
        channels,
        method: MethodConfig {
            compression,
            ..MethodConfig::default()
        },
        handshake_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..MigrationConfig::default()
    }
}

fn source_ram() -> GuestRam {
    let mut ram = GuestRam::new();
    ram.push(dense_block("m0", 2048)).unwrap();
    ram
}

/// Migrates over `t` with these TLS sides; returns both results.
fn run(
    t: Transport,
    client: TlsClient,
    server: TlsServer,
    compression: Compression,
) -> (
    multifd::Result<multifd::Stats>,
    multifd::Result<multifd::Incoming>,
    GuestRam,
) {
    let ram = source_ram();
    let Bound { listener, uri, dir } = bind(t);
    let ropts = ReceiveOptions {
        config: config(4, compression),
        accept_timeout: Some(FAST),
        tls: Some(server),
        ..ReceiveOptions::default()
    };
    let receiving = start_receiver(listener, ropts, Box::new(AnonRam));
    let sopts = SourceOptions {
        config: config(4, compression),
        tls: Some(client),
        ..SourceOptions::default()
    };
    let sent = migrate(&uri, &ram, &mut StaticRam, &sopts, &Progress::default());
    let (got, _) = receiving
        .wait(Duration::from_secs(20))
        .expect("receiver hangs");
    receiving.handle.join().unwrap();
    drop(dir);
    (sent, got, ram)
}

fn x509_client(dir: &Path, host: Option<&str>) -> TlsClient {
    TlsClient::x509(dir, host.map(str::to_owned)).unwrap()
}

#[test]
fn x509_mutual_migrates_every_page_with_every_method() {
    let _g = serial();
    let pki = Pki::new();
    for t in TRANSPORTS {
        for compression in [Compression::None, Compression::Zlib, Compression::Zstd] {
            let base = Baseline::take();
            let server = TlsServer::x509(&pki.server, true, None).unwrap();
            // A Unix socket has no host: the certificate is checked
            // against "localhost" unless told otherwise.
            let (sent, got, src) = run(t, x509_client(&pki.client, None), server, compression);
            sent.unwrap_or_else(|e| panic!("{t:?} {compression}: sender: {}", message(&e)));
            let inc =
                got.unwrap_or_else(|e| panic!("{t:?} {compression}: receiver: {}", message(&e)));
            assert_eq!(ram_diff(&src, &inc.ram), None, "{t:?} {compression}");
            drop(inc);
            base.check(&format!("{t:?} {compression}: x509"));
        }
    }
}

#[test]
fn an_anonymous_client_is_rejected_on_both_sides_in_bounded_time() {
    let _g = serial();
    let pki = Pki::new();
    for t in TRANSPORTS {
        let base = Baseline::take();
        let started = Instant::now();
        let server = TlsServer::x509(&pki.server, true, None).unwrap();
        let (sent, got, _) = run(
            t,
            x509_client(&pki.anon_client, None),
            server,
            Compression::None,
        );
        assert!(started.elapsed() < FAST, "{t:?}: {:?}", started.elapsed());
        let got = got.map(|_| ()).unwrap_err();
        assert_err!(got, Error::Tls { .. }, "{t:?}: receiver");
        assert!(
            message(&got).to_lowercase().contains("certificate"),
            "{t:?}: {}",
            message(&got)
        );
        let sent = sent.map(|_| ()).unwrap_err();
        assert_err!(
            sent,
            Error::Tls { .. } | Error::Io { .. } | Error::PeerClosed { .. },
            "{t:?}: sender"
        );
        base.check(&format!("{t:?}: anonymous client"));
    }
}

#[test]
fn without_peer_verification_an_anonymous_client_migrates() {
    let _g = serial();
    let pki = Pki::new();
    let t = Transport::Tcp;
    let server = TlsServer::x509(&pki.server, false, None).unwrap();
    let (sent, got, src) = run(
        t,
        x509_client(&pki.anon_client, None),
        server,
        Compression::None,
    );
    sent.unwrap_or_else(|e| panic!("sender: {}", message(&e)));
    let inc = got.unwrap_or_else(|e| panic!("receiver: {}", message(&e)));
    assert_eq!(ram_diff(&src, &inc.ram), None);
}

#[test]
fn the_server_certificate_must_name_the_host() {
    let _g = serial();
    let pki = Pki::new();
    let t = Transport::Tcp;
    // A certificate for other.example, reached as 127.0.0.1: refused.
    let base = Baseline::take();
    let server = TlsServer::x509(&pki.other_host_server, true, None).unwrap();
    let (sent, got, _) = run(t, x509_client(&pki.client, None), server, Compression::None);
    let sent = sent.map(|_| ()).unwrap_err();
    assert_err!(
        sent,
        Error::Tls {
            endpoint: multifd::Endpoint::Main,
            ..
        },
        "mismatch"
    );
    assert!(
        message(&sent).contains("not valid for name"),
        "{}",
        message(&sent)
    );
    assert!(got.is_err(), "the receiver completed a refused migration");
    base.check("host mismatch");
    // The same, with the host name overridden to what the certificate says.
    let server = TlsServer::x509(&pki.other_host_server, true, None).unwrap();
    let (sent, got, src) = run(
        t,
        x509_client(&pki.client, Some("other.example")),
        server,
        Compression::None,
    );
    sent.unwrap_or_else(|e| panic!("override: sender: {}", message(&e)));
    let inc = got.unwrap_or_else(|e| panic!("override: receiver: {}", message(&e)));
    assert_eq!(ram_diff(&src, &inc.ram), None);
}

#[test]
fn only_authorized_client_names_are_accepted() {
    let _g = serial();
    let pki = Pki::new();
    let t = Transport::Unix;
    // GnuTLS's format, certificate order: O first, then CN.
    let ok = TlsServer::x509(&pki.server, true, Some(vec!["O=multifd,CN=client".into()])).unwrap();
    let (sent, got, src) = run(t, x509_client(&pki.client, None), ok, Compression::None);
    if let Err(e) = &got {
        panic!("authorized: receiver: {}", message(e));
    }
    sent.unwrap_or_else(|e| panic!("authorized: sender: {}", message(&e)));
    assert_eq!(ram_diff(&src, &got.unwrap().ram), None);
    let base = Baseline::take();
    let denied =
        TlsServer::x509(&pki.server, true, Some(vec!["CN=client,O=multifd".into()])).unwrap();
    let (_, got, _) = run(t, x509_client(&pki.client, None), denied, Compression::None);
    let err = got.map(|_| ()).unwrap_err();
    assert_err!(err, Error::Tls { .. }, "denied");
    assert!(
        message(&err).contains("O=multifd,CN=client"),
        "{}",
        message(&err)
    );
    base.check("authz denied");
}

#[test]
fn credentials_that_do_not_load_are_a_typed_error() {
    let pki = Pki::new();
    let empty = tempdir();
    assert_err!(
        TlsClient::x509(empty.path(), None).unwrap_err(),
        Error::TlsCredentials { .. },
        "no ca-cert.pem"
    );
    assert_err!(
        TlsServer::x509(&pki.client, true, None).unwrap_err(),
        Error::TlsCredentials { .. },
        "no server cert"
    );
    std::fs::write(empty.path().join("ca-cert.pem"), "not a certificate").unwrap();
    assert_err!(
        TlsClient::x509(empty.path(), None).unwrap_err(),
        Error::TlsCredentials { .. },
        "garbage ca-cert.pem"
    );
}

#[cfg(feature = "tls-psk")]
#[test]
fn psk_migrates_and_a_wrong_key_is_refused() {
    let _g = serial();
    let pki = Pki::new();
    for t in TRANSPORTS {
        let (sent, got, src) = run(
            t,
            TlsClient::psk(&pki.psk, "qemu").unwrap(),
            TlsServer::psk(&pki.psk).unwrap(),
            Compression::Zstd,
        );
        sent.unwrap_or_else(|e| panic!("{t:?}: psk sender: {}", message(&e)));
        let inc = got.unwrap_or_else(|e| panic!("{t:?}: psk receiver: {}", message(&e)));
        assert_eq!(ram_diff(&src, &inc.ram), None);
        drop(inc);
        let base = Baseline::take();
        let (sent, got, _) = run(
            t,
            TlsClient::psk(&pki.wrong_psk, "qemu").unwrap(),
            TlsServer::psk(&pki.psk).unwrap(),
            Compression::None,
        );
        assert!(sent.is_err() && got.is_err(), "{t:?}: a wrong key migrated");
        assert_err!(
            got.map(|_| ()).unwrap_err(),
            Error::Tls { .. },
            "{t:?}: wrong key"
        );
        base.check(&format!("{t:?}: wrong psk"));
    }
}
