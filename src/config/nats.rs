//! How Weir authenticates to NATS and protects the connection: the `[nats]` table.
//!
//! ```toml
//! nats_url = "tls://nats.internal:4222"
//! [nats]
//! creds_file = "/etc/weir/weir.creds"     # or nkey_file, or user + password
//! tls_ca_file = "/etc/weir/ca.pem"        # the CA that signed the server's certificate
//! tls_cert_file = "/etc/weir/client.pem"  # mutual TLS: a client certificate...
//! tls_key_file = "/etc/weir/client.key"   # ...and its key
//! tls_required = true                     # refuse a server that does not offer TLS
//! ```
//!
//! One way to authenticate at most: a credentials file (user JWT and seed, as `nsc generate
//! creds` writes it), an NKey seed file, or a user and password. The password may come from
//! `WEIR_NATS_PASSWORD` instead of the file. Every file is read and checked at start, so a
//! wrong path fails the start (exit 64) rather than the first reconnect; messages name the
//! field and never show a secret. Relative paths are relative to the working directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::tls;

/// A secret (a password, an NKey seed). `Debug` shows `<redacted>`, so a config printed in a
/// log or a panic message does not carry it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The secret itself, to hand to the NATS client. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Who Weir is to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (or credentials in the URL: `nats://user:pass@host`).
    #[default]
    None,
    /// A credentials file: the user JWT and its NKey seed (operator/JWT mode).
    Creds(PathBuf),
    /// An NKey user's seed, read from `nkey_file` at start.
    NKey(Secret),
    /// A user and password.
    UserPassword { user: String, password: Secret },
}

/// TLS towards NATS. With none of these set, TLS is still used when the URL is `tls://` or the
/// server requires it, verified against the system's roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// A CA (PEM) to verify the server's certificate with.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse to talk to a server that does not offer TLS.
    pub required: bool,
}

/// The validated `[nats]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSettings {
    pub auth: Auth,
    pub tls: Tls,
}

/// The `[nats]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileNats {
    creds_file: Option<PathBuf>,
    nkey_file: Option<PathBuf>,
    user: Option<String>,
    password: Option<Secret>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_required: Option<bool>,
}

fn file_error(field: &str, path: &Path, problem: impl ToString, fix: &'static str) -> ConfigError {
    ConfigError::File {
        field: format!("nats.{field}"),
        path: path.display().to_string(),
        problem: problem.to_string(),
        fix,
    }
}

fn invalid(field: &str, value: &str, fix: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        fix,
    }
}

impl NatsSettings {
    /// Validates the table; `env_password` is `WEIR_NATS_PASSWORD`, which beats the file.
    pub(super) fn from_file(
        f: FileNats,
        env_password: Option<String>,
    ) -> Result<NatsSettings, ConfigError> {
        let password = env_password.map(Secret).or(f.password);
        let ways: Vec<&str> = [
            ("creds_file", f.creds_file.is_some()),
            ("nkey_file", f.nkey_file.is_some()),
            ("user", f.user.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if ways.len() > 1 {
            return Err(invalid(
                "nats",
                &ways.join(" and "),
                "set one way to authenticate: creds_file, nkey_file, or user with password",
            ));
        }
        let auth = if let Some(path) = f.creds_file {
            let text = String::from_utf8(read("creds_file", &path)?).unwrap_or_default();
            if !text.contains("BEGIN NATS USER JWT") || !text.contains("BEGIN USER NKEY SEED") {
                return Err(file_error(
                    "creds_file",
                    &path,
                    "not a NATS credentials file",
                    "give the file `nsc generate creds` writes: a user JWT and its NKey seed",
                ));
            }
            Auth::Creds(path)
        } else if let Some(path) = f.nkey_file {
            let text = String::from_utf8(read("nkey_file", &path)?).unwrap_or_default();
            let seed = text
                .split_whitespace()
                .find(|t| t.starts_with("SU") && nkeys::KeyPair::from_seed(t).is_ok());
            match seed {
                Some(seed) => Auth::NKey(Secret(seed.to_string())),
                None => {
                    return Err(file_error(
                        "nkey_file",
                        &path,
                        "holds no user NKey seed",
                        "give a file holding the user's seed (starts with SU, as `nk -gen user` prints it); the server lists its public key (U...)",
                    ))
                }
            }
        } else if let Some(user) = f.user {
            if user.is_empty() {
                return Err(invalid(
                    "nats.user",
                    "",
                    "give the user name nats-server knows Weir by",
                ));
            }
            match password {
                Some(p) if !p.0.is_empty() => Auth::UserPassword { user, password: p },
                _ => {
                    return Err(invalid(
                        "nats.password",
                        "<not set>",
                        "set nats.password, or better WEIR_NATS_PASSWORD, with nats.user",
                    ))
                }
            }
        } else {
            if password.is_some() {
                return Err(invalid(
                    "nats.password",
                    "<set, not shown>",
                    "a password needs nats.user; set it, or remove nats.password and WEIR_NATS_PASSWORD",
                ));
            }
            Auth::None
        };
        if let Some(ca) = &f.tls_ca_file {
            tls::certificates(ca).map_err(|e| {
                file_error(
                    "tls_ca_file",
                    ca,
                    e,
                    "give the PEM certificate of the CA that signed the server's certificate",
                )
            })?;
        }
        let client_cert = match (f.tls_cert_file, f.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                tls::certificates(&cert).map_err(|e| {
                    file_error(
                        "tls_cert_file",
                        &cert,
                        e,
                        "give Weir's client certificate (PEM), with tls_key_file",
                    )
                })?;
                tls::private_key(&key).map_err(|e| {
                    file_error(
                        "tls_key_file",
                        &key,
                        e,
                        "give the PEM private key of tls_cert_file",
                    )
                })?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "nats.tls_key_file",
                    "<not set>",
                    "a client certificate needs its key: set tls_key_file with tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "nats.tls_cert_file",
                    "<not set>",
                    "a client key needs its certificate: set tls_cert_file with tls_key_file",
                ))
            }
        };
        Ok(NatsSettings {
            auth,
            tls: Tls {
                ca_file: f.tls_ca_file,
                client_cert,
                required: f.tls_required.unwrap_or(false),
            },
        })
    }

    /// True when these settings ask for TLS (a CA, a client certificate, or `tls_required`).
    pub fn wants_tls(&self) -> bool {
        self.tls.required || self.tls.ca_file.is_some() || self.tls.client_cert.is_some()
    }

    /// The async-nats options for these settings, named `name` (shown in the server's
    /// connection list). Reads the credentials file.
    pub async fn options(&self, name: &str) -> std::io::Result<async_nats::ConnectOptions> {
        let mut o = async_nats::ConnectOptions::new().name(name);
        o = match &self.auth {
            Auth::None => o,
            Auth::Creds(path) => o.credentials_file(path).await?,
            Auth::NKey(seed) => o.nkey(seed.expose().to_string()),
            Auth::UserPassword { user, password } => {
                o.user_and_password(user.clone(), password.expose().to_string())
            }
        };
        if let Some(ca) = &self.tls.ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client_cert {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls.required {
            o = o.require_tls(true);
        }
        Ok(o)
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    tls::read(path).map_err(|e| match e {
        tls::PemError::Read { source, .. } => file_error(
            field,
            path,
            source,
            "give a path Weir's user can read (relative paths start at the working directory)",
        ),
        other => file_error(field, path, other, "give a readable file"),
    })
}

/// `url` (or a comma-separated list) with any `user:password@` replaced by `***@`, for
/// messages and logs.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (scheme, rest) = one.split_once("://").unwrap_or(("", one));
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) if scheme.is_empty() => format!("***@{}", &rest[at + 1..]),
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => one.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Overrides};
    use super::*;

    fn load(text: &str, env_password: Option<&str>) -> Result<Config, String> {
        let o = Overrides {
            nats_password: env_password.map(String::from),
            ..Overrides::default()
        };
        Config::from_toml(text, "test.toml", &o).map_err(|e| e.to_string())
    }

    fn file(content: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        f
    }

    #[test]
    fn user_and_password_with_the_password_from_the_environment() {
        let c = load(
            "[nats]\nuser = \"weir\"\npassword = \"in-file\"",
            Some("in-env"),
        )
        .unwrap();
        assert_eq!(
            c.nats.auth,
            Auth::UserPassword {
                user: "weir".into(),
                password: Secret::new("in-env".into())
            }
        );
        assert!(!format!("{c:?}").contains("in-env"), "Debug must redact");
        let e = load("[nats]\nuser = \"weir\"", None).unwrap_err();
        assert!(
            e.contains("nats.password") && e.contains("WEIR_NATS_PASSWORD"),
            "{e}"
        );
        let e = load("", Some("s3cret-pw")).unwrap_err();
        assert!(e.contains("nats.user") && !e.contains("s3cret-pw"), "{e}");
        // A mistyped password line is reported without its value.
        let e = load("[nats]\npassword = s3cret-pw", None).unwrap_err();
        assert!(e.contains("password") && !e.contains("s3cret-pw"), "{e}");
        let e = load("[nats]\npasword = \"s3cret-pw\"", None).unwrap_err();
        assert!(!e.contains("s3cret-pw"), "{e}");
    }

    #[test]
    fn one_way_to_authenticate() {
        let creds = file("x");
        let e = load(
            &format!(
                "[nats]\nuser = \"weir\"\npassword = \"p\"\ncreds_file = {:?}",
                creds.path()
            ),
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("creds_file and user") && e.contains("one way"),
            "{e}"
        );
    }

    #[test]
    fn files_are_checked_and_never_shown() {
        let e = load("[nats]\nnkey_file = \"/no/such/seed\"", None).unwrap_err();
        assert!(
            e.contains("nats.nkey_file") && e.contains("/no/such/seed"),
            "{e}"
        );
        let garbage = file("SUNOTASEEDATALL-but-secret-looking");
        let e = load(&format!("[nats]\nnkey_file = {:?}", garbage.path()), None).unwrap_err();
        assert!(
            e.contains("no user NKey seed") && !e.contains("secret-looking"),
            "{e}"
        );
        let kp = nkeys::KeyPair::new_user();
        let seed = file(&format!("# weir\n{}\n", kp.seed().unwrap()));
        let c = load(&format!("[nats]\nnkey_file = {:?}", seed.path()), None).unwrap();
        assert_eq!(c.nats.auth, Auth::NKey(Secret::new(kp.seed().unwrap())));
        assert!(!format!("{c:?}").contains(&kp.seed().unwrap()));
        let e = load(&format!("[nats]\ncreds_file = {:?}", seed.path()), None).unwrap_err();
        assert!(
            e.contains("not a NATS credentials file") && !e.contains("SU"),
            "{e}"
        );
        let e = load(&format!("[nats]\ntls_ca_file = {:?}", seed.path()), None).unwrap_err();
        assert!(
            e.contains("nats.tls_ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = load(&format!("[nats]\ntls_cert_file = {:?}", seed.path()), None).unwrap_err();
        assert!(
            e.contains("nats.tls_key_file") && e.contains("needs its key"),
            "{e}"
        );
        let e = load(&format!("admin_tls_key_file = {:?}", seed.path()), None).unwrap_err();
        assert!(e.contains("admin_tls_cert_file"), "{e}");
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("nats://weir:s3cret@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(redact_url("tls://host:4222"), "tls://host:4222");
        assert_eq!(redact_url("u:p@host:4222"), "***@host:4222");
        assert_eq!(
            redact_url("nats://a:b@h1:4222,nats://c:d@h2:4222"),
            "nats://***@h1:4222,nats://***@h2:4222"
        );
    }
}
