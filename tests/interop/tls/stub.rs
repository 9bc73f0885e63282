//! A TLS 1.3 server that presents whatever certificate its directory holds, expired or not
//! yet valid included (QEMU refuses to load those, and a helper may too): the peer a client
//! needs to show that it rejects them. rustls does not check its own certificate's dates.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Serves one handshake on `sock` with `dir`'s server-cert.pem / server-key.pem; the thread
/// returns how the handshake ended (the client's alert, or EOF).
pub(super) fn serve(dir: &Path, sock: OwnedFd) -> JoinHandle<String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("server-cert.pem"))
            .expect("server-cert.pem")
            .collect::<Result<_, _>>()
            .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).expect("server-key.pem");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("the stub's certificate");
    let mut sock = UnixStream::from(sock);
    // Bounds the test if the client never answers (it should abort at once).
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    std::thread::spawn(move || {
        let mut conn = match rustls::ServerConnection::new(Arc::new(config)) {
            Ok(c) => c,
            Err(e) => return format!("server connection: {e}"),
        };
        loop {
            match conn.complete_io(&mut sock) {
                Ok((0, 0)) => return "EOF".to_string(),
                Ok(_) if !conn.is_handshaking() => return "handshake completed".to_string(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    })
}
