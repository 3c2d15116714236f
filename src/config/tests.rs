use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "test.toml", &Overrides::default())
}

#[test]
fn the_documented_example_parses() {
    let c = load(
        r#"
nats_url = "nats://127.0.0.1:4222"
http_addr = "127.0.0.1:9090"
partitions = 16
[limits.default]
rate = "20/s"
burst = 1
[limits.keys.acme]
rate = "100/s"
burst = 10
"#,
    )
    .unwrap();
    assert_eq!(c.partitions, 16);
    assert_eq!(c.default_limit.rate.count, 20);
    assert_eq!(c.key_limits["acme"].burst, 10);
    assert_eq!(
        c.key_limits["acme"].rate.period(),
        Duration::from_millis(10)
    );
}

#[test]
fn empty_config_is_all_defaults() {
    let c = load("").unwrap();
    assert_eq!(c.partitions, 16);
    assert_eq!(c.default_limit, Limit::default());
    assert!(c.nats_url.is_none());
}

#[test]
fn rates_parse_per_unit() {
    assert_eq!(
        "600/m".parse::<Rate>().unwrap().period(),
        Duration::from_millis(100)
    );
    assert_eq!(
        "3600/h".parse::<Rate>().unwrap().period(),
        Duration::from_secs(1)
    );
    assert!("0/s".parse::<Rate>().unwrap().is_paused());
    for bad in ["10", "ten/s", "10/d", "-1/s", "1e99/s", ""] {
        assert!(bad.parse::<Rate>().is_err(), "{bad} should be refused");
    }
}

#[test]
fn errors_name_the_field_and_the_fix() {
    let e = load("[limits.keys.acme]\nrate = \"fast\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("limits.keys.acme.rate") && e.contains("e.g."),
        "{e}"
    );
    let e = load("partitions = 0").unwrap_err().to_string();
    assert!(e.contains("partitions") && e.contains("1 to 1024"), "{e}");
    let e = load("http_addr = \"nowhere\"").unwrap_err().to_string();
    assert!(e.contains("http_addr"), "{e}");
    let e = load("partitions = 4\nowned_partitions = [1, 4]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("owned_partitions"), "{e}");
    assert_eq!(
        load("partitions = 4\nowned_partitions = [3, 1]")
            .unwrap()
            .owned_partitions,
        Some(vec![1, 3])
    );
    assert_eq!(load("").unwrap().owned_partitions, None);
    let e = load("member = \"a.b\"").unwrap_err().to_string();
    assert!(e.contains("member") && e.contains("pod name"), "{e}");
    assert_eq!(load("member = \"weir-0\"").unwrap().member, "weir-0");
    let e = load("lease_ms = 10").unwrap_err().to_string();
    assert!(e.contains("lease_ms"), "{e}");
    let e = load("colour = 1").unwrap_err().to_string();
    assert!(e.contains("colour"), "{e}");
    let e = load("horizon_ms = 1\npartitions = \"many\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2: `partitions = \"many\"`"), "{e}");
    let e = load("[limits.default]\nrate = \"1/s\"\nburst = 0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.default.burst"), "{e}");
}

#[test]
fn job_status_retention_parses() {
    assert_eq!(
        load("").unwrap().job_status_retention,
        Some(Duration::from_secs(3600))
    );
    let r =
        |t: &str| load(&format!("job_status_retention = \"{t}\"")).map(|c| c.job_status_retention);
    assert_eq!(r("0").unwrap(), None);
    assert_eq!(r("0s").unwrap(), None);
    assert_eq!(r("1s").unwrap(), Some(Duration::from_secs(1)));
    assert_eq!(r("1500ms").unwrap(), Some(Duration::from_millis(1500)));
    assert_eq!(r("30m").unwrap(), Some(Duration::from_secs(1800)));
    assert_eq!(r("7d").unwrap(), Some(Duration::from_secs(7 * 86_400)));
    for bad in ["", "1", "10x", "-1h", "500ms", "31d", "1.5h", "h"] {
        let e = r(bad).unwrap_err().to_string();
        assert!(
            e.contains("job_status_retention") && e.contains("\"0\" to keep no job status"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn flags_and_env_beat_the_file() {
    let o = Overrides {
        nats_url: Some("nats://flag:4222".into()),
        http_addr: Some("0.0.0.0:1".into()),
        admin_token: Some("from-env".into()),
        member: Some("pod-1".into()),
        nats_password: None,
    };
    let c = Config::from_toml(
        "nats_url = \"nats://file:4222\"\nadmin_token = \"from-file\"\nmember = \"m\"",
        "t",
        &o,
    )
    .unwrap();
    assert_eq!(c.nats_url.as_deref(), Some("nats://flag:4222"));
    assert_eq!(c.http_addr.port(), 1);
    assert_eq!(c.admin_token.unwrap().expose(), "from-env");
    assert_eq!(c.member, "pod-1");
}

#[test]
fn the_admin_token_is_checked_and_never_shown() {
    let c = load("admin_token = \"s3cret-token\"").unwrap();
    assert_eq!(c.admin_token.as_ref().unwrap().expose(), "s3cret-token");
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "Debug must redact the token"
    );
    for bad in ["", "has space", "tab\\there"] {
        let e = load(&format!("admin_token = \"{bad}\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_token") && e.contains("printable"), "{e}");
        if !bad.is_empty() {
            assert!(!e.contains(bad), "the message must not echo the token: {e}");
        }
    }
}
