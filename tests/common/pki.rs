//! Security test material, made fresh per test in a temporary directory: a test CA with a
//! server and a client certificate (rcgen), NKeys, and NATS JWTs for operator mode.
//!
//! No crate encodes NATS JWT claims for Rust, so they are built here as nats-server reads them:
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`, the claims JSON, each base64url without padding,
//! and the issuer's NKey signature over `header.claims`.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose,
};
use serde_json::{json, Value};

/// A temporary directory of test files.
pub struct Dir(tempfile::TempDir);

impl Dir {
    pub fn new() -> Dir {
        Dir(tempfile::Builder::new()
            .prefix("weir-sec-")
            .tempdir()
            .expect("temp dir"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `name` and returns its path.
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, content).expect("write test file");
        p
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by
/// it, plus a second CA that signed nothing of these (for the wrong-CA case).
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

impl Pki {
    pub fn new(dir: &Dir) -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca_p = ca_params("weir test CA");
        let ca_cert = ca_p.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_p, ca_key);
        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = rcgen::KeyPair::generate().expect("leaf key");
            let mut p = CertificateParams::new(names).expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = p.signed_by(&key, &issuer).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "nats-server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["weir".into()],
            "weir",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let other_key = rcgen::KeyPair::generate().expect("other CA key");
        let other = ca_params("another CA")
            .self_signed(&other_key)
            .expect("other CA");
        Pki {
            ca: dir.write("ca.pem", &ca_cert.pem()),
            server_cert: dir.write("server.pem", &server_cert),
            server_key: dir.write("server-key.pem", &server_key),
            client_cert: dir.write("client.pem", &client_cert),
            client_key: dir.write("client-key.pem", &client_key),
            other_ca: dir.write("other-ca.pem", &other.pem()),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A NATS JWT: `nats` claims about `subject`, issued and signed by `issuer`.
pub fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let claims = json!({
        "jti": format!("WEIRTEST{}X{n}", std::process::id()),
        "iat": super::unix_ms() / 1000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let input = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let sig = issuer.sign(input.as_bytes()).expect("nkey signs");
    format!("{input}.{}", b64(&sig))
}

/// An operator-mode setup: operator, system account, an account with JetStream, and users.
pub struct Operator {
    operator: nkeys::KeyPair,
    system: nkeys::KeyPair,
    pub account: nkeys::KeyPair,
}

impl Operator {
    pub fn new() -> Operator {
        Operator {
            operator: nkeys::KeyPair::new_operator(),
            system: nkeys::KeyPair::new_account(),
            account: nkeys::KeyPair::new_account(),
        }
    }

    /// The nats-server configuration: operator JWT, system account, both accounts preloaded
    /// in a memory resolver.
    pub fn server_config(&self) -> String {
        let op = self.operator.public_key();
        let operator_jwt = jwt(
            &self.operator,
            &op,
            "weir-test",
            json!({"type": "operator", "version": 2, "system_account": self.system.public_key()}),
        );
        let account = |kp: &nkeys::KeyPair, name: &str, js: bool| {
            let store = if js { -1 } else { 0 };
            jwt(
                &self.operator,
                &kp.public_key(),
                name,
                json!({
                    "limits": {
                        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                        "wildcards": true, "conn": -1, "leaf": -1,
                        "mem_storage": store, "disk_storage": store, "streams": -1, "consumer": -1
                    },
                    "default_permissions": {"pub": {}, "sub": {}},
                    "type": "account",
                    "version": 2
                }),
            )
        };
        format!(
            "operator: \"{operator_jwt}\"\nsystem_account: \"{sys}\"\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: \"{sys_jwt}\"\n  {acc}: \"{acc_jwt}\"\n}}\n",
            sys = self.system.public_key(),
            sys_jwt = account(&self.system, "SYS", false),
            acc = self.account.public_key(),
            acc_jwt = account(&self.account, "WEIR", true),
        )
    }

    /// A credentials file's text for a new user of `account` (JWT and seed).
    pub fn creds(account: &nkeys::KeyPair, name: &str) -> String {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            account,
            &user.public_key(),
            name,
            json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                   "type": "user", "version": 2}),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("user seed")
        )
    }
}
