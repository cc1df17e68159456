//! QUIC and TLS configuration: a fresh self-signed certificate per endpoint, a client that
//! accepts any server certificate (peers authenticate by the cluster key, see [`super::auth`]),
//! TLS 1.3 only, no 0-RTT, and transport windows sized for GB/s transfers.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::{BindError, PeerConfig, ALPN, SERVER_NAME};

/// Accepts any certificate, but still checks the handshake signature with the certificate's
/// key, so the TLS session is a normal one; who the peer is, is settled by the cluster-key proofs
/// bound to this session.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_err(e: impl std::fmt::Display) -> BindError {
    BindError::Tls(e.to_string())
}

/// The transport parameters of one side.
fn transport(config: &PeerConfig, server: bool) -> Result<TransportConfig, BindError> {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(config.idle_timeout).map_err(tls_err)?;
    t.max_idle_timeout(Some(idle))
        // Nobody opens unidirectional streams; only clients open bidirectional ones.
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_concurrent_bidi_streams(VarInt::from_u32(if server {
            config.max_streams_per_connection
        } else {
            0
        }))
        .send_window(config.send_window);
    if server {
        // A server only receives requests (a few KiB each): small windows keep what a client
        // can make it buffer small.
        t.stream_receive_window(VarInt::from_u32(64 << 10))
            .receive_window(VarInt::from_u32(1 << 20))
            // Chunks go out one after the other, not interleaved: each completes as early as it
            // can, so the client's next request overlaps the rest instead of all of them
            // finishing together and leaving the link idle for a round trip.
            .send_fairness(false);
    } else {
        t.stream_receive_window(VarInt::from_u32(config.stream_receive_window))
            .receive_window(VarInt::from_u32(config.receive_window))
            // Keep pooled connections alive through NATs and the idle timeout.
            .keep_alive_interval(Some(config.idle_timeout / 3));
    }
    Ok(t)
}

/// The server and client configurations of an endpoint.
pub(crate) fn configs(
    config: &PeerConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), BindError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()]).map_err(tls_err)?;
    let cert_der = CertificateDer::from(cert.cert.der().to_vec());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .map_err(tls_err)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data could be replayed, and nothing is served before authentication.
    server_tls.max_early_data_size = 0;
    let server_crypto = QuicServerConfig::try_from(server_tls).map_err(tls_err)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(Arc::new(transport(config, true)?));
    // Connection attempts queued before the accept loop sees them.
    server.max_incoming(config.max_connections.max(1) * 2);

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let client_crypto = QuicClientConfig::try_from(client_tls).map_err(tls_err)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(Arc::new(transport(config, false)?));
    Ok((server, client))
}
