use super::*;

const MINIMAL: &str = r#"
gateway_id = "gw-1"
[sources.demo]
[kafka]
brokers = "127.0.0.1:9092"
"#;

fn error_of(text: &str) -> String {
    Config::from_toml(text, "test.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn embedded_default_is_valid_and_uses_demo_source() {
    let config = Config::embedded_default().expect("sim.toml must validate");
    assert!(config.sources.demo.is_some());
    assert!(config.sources.mqtt.is_none());
    assert_eq!(config.outbox.synchronous, SyncMode::Full);
    assert_eq!(config.transactional_id(), "edge-agent-sim-gateway-1");
}

#[test]
fn transaction_lanes_default_to_two_with_distinct_ids() {
    let c = Config::from_toml(MINIMAL, "t").unwrap();
    assert_eq!(c.kafka.transaction_lanes, 2);
    assert_eq!(c.lane_transactional_id(0), "edge-agent-gw-1");
    assert_eq!(c.lane_transactional_id(1), "edge-agent-gw-1/lane-1");
    // '/' is not allowed in gateway ids, so no gateway's lane 0 id equals
    // another's lane 1 id.
    assert!(error_of(&MINIMAL.replace("gw-1", "gw-1/lane-1")).contains("`gateway_id`"));
    for lanes in [0, 4] {
        let err = error_of(&MINIMAL.replace(
            "brokers = \"127.0.0.1:9092\"",
            &format!("brokers = \"x\"\ntransaction_lanes = {lanes}"),
        ));
        assert_eq!(
            err,
            format!("invalid config: `kafka.transaction_lanes` = {lanes}: 1, 2 or 3")
        );
    }
    for lanes in [1, 3] {
        let c = Config::from_toml(
            &MINIMAL.replace(
                "brokers = \"127.0.0.1:9092\"",
                &format!("brokers = \"x\"\ntransaction_lanes = {lanes}"),
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.kafka.transaction_lanes, lanes);
    }
    assert_eq!(
        Config::from_toml(MINIMAL, "t")
            .unwrap()
            .lane_transactional_id(2),
        "edge-agent-gw-1/lane-2"
    );
}

#[test]
fn every_board_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../board-configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("board-configs folder") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1, "no board config found in {}", dir.display());
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::from_toml(MINIMAL, "t").unwrap();
    assert_eq!(c.validation.max_payload_bytes, 4096);
    assert_eq!(c.outbox.batch_max_records, 5000);
    assert_eq!(c.outbox.max_size_bytes, 256 * 1024 * 1024);
    assert_eq!(c.outbox.batch_linger_ms, 2);
    assert_eq!(c.outbox.page_size, 4096);
    let paged = format!("{MINIMAL}[outbox]\npage_size = 16384\n");
    assert_eq!(
        Config::from_toml(&paged, "t").unwrap().outbox.page_size,
        16384
    );
    assert!(c.outbox.uplink_ends_linger);
    let kept = format!("{MINIMAL}[outbox]\nuplink_ends_linger = false\n");
    assert!(
        !Config::from_toml(&kept, "t")
            .unwrap()
            .outbox
            .uplink_ends_linger
    );
    assert_eq!(c.kafka.topic_data, "rich-iot-data");
    assert_eq!(c.kafka.topic_offsets, "edge-offsets");
    assert_eq!(c.data_dir, PathBuf::from("./data"));
}

#[test]
fn unknown_key_is_named() {
    let text = MINIMAL.replace("[kafka]", "[kafka]\nbrokres = \"x\"");
    let err = error_of(&text);
    assert!(err.contains("unknown field `brokres`"), "{err}");
    assert!(err.contains("test.toml"), "{err}");
}

#[test]
fn bad_values_name_key_value_and_allowed() {
    let err = error_of(&MINIMAL.replace("gw-1", "gw 1/x"));
    assert_eq!(
        err,
        "invalid config: `gateway_id` = \"gw 1/x\": 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
    );
    let err = error_of(&format!("{MINIMAL}\n[outbox]\nbatch_max_records = 0\n"));
    assert_eq!(
        err,
        "invalid config: `outbox.batch_max_records` = 0: 1 to 100000"
    );
    for bad in [0, 2048, 5000, 131072] {
        let err = error_of(&format!("{MINIMAL}\n[outbox]\npage_size = {bad}\n"));
        assert_eq!(
            err,
            format!(
                "invalid config: `outbox.page_size` = {bad}: 4096, 8192, 16384, 32768 or 65536"
            )
        );
    }
    let err = error_of(&MINIMAL.replace(
        "brokers = \"127.0.0.1:9092\"",
        "brokers = \"x\"\ncompression = \"brotli\"",
    ));
    assert_eq!(
        err,
        "invalid config: `kafka.compression` = \"brotli\": one of none, gzip, snappy, lz4, zstd"
    );
}

#[test]
fn wrong_type_is_reported_by_key() {
    let err = error_of(&format!(
        "{MINIMAL}\n[validation]\nmax_payload_bytes = \"4k\"\n"
    ));
    assert!(err.contains("max_payload_bytes"), "{err}");
}

#[test]
fn a_source_is_required() {
    let err = error_of("gateway_id = \"g\"\n[kafka]\nbrokers = \"b:1\"\n");
    assert!(
        err.contains(
            "configure at least one of [sources.mqtt], [sources.demo] or [[sources.serial]]"
        ),
        "{err}"
    );
}

#[test]
fn reserved_librdkafka_options_are_refused() {
    let text = format!("{MINIMAL}\n[kafka.librdkafka_options]\n\"transactional.id\" = \"x\"\n");
    let err = error_of(&text);
    assert!(
        err.contains("`kafka.librdkafka_options` = \"transactional.id\""),
        "{err}"
    );
    assert!(err.contains("please delete it"), "{err}");
}

#[test]
fn mqtt_topic_filters_are_checked() {
    let text = MINIMAL.replace(
        "[sources.demo]",
        "[sources.mqtt]\nhost = \"h\"\nclient_id = \"c\"\ntopics = [\"devices/#/x\"]",
    );
    let err = error_of(&text);
    assert!(
        err.starts_with("invalid config: `sources.mqtt.topics` = \"devices/#/x\""),
        "{err}"
    );
}

#[test]
fn ids() {
    assert!(is_valid_id("dev-001.a_b"));
    assert!(!is_valid_id(""));
    assert!(!is_valid_id("a/b"));
    assert!(!is_valid_id("a+b"));
    assert!(!is_valid_id(&"x".repeat(65)));
    assert!(is_valid_id(&"x".repeat(64)));
    // Every character, alone and inside an id: only the rule's.
    for c in (0..=0x7f_u8)
        .map(char::from)
        .chain(['é', '\u{ff}', '\u{2028}', '😀'])
    {
        let allowed = c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        assert_eq!(is_valid_id(&c.to_string()), allowed, "{c:?}");
        assert_eq!(is_valid_id(&format!("ab{c}cd")), allowed, "{c:?}");
    }
}

#[test]
fn serial_ports_are_checked() {
    let ok = MINIMAL.replace("[sources.demo]", "[[sources.serial]]\npath = \"/dev/serial/by-id/usb-FTDI-if00\"\nparity = \"even\"\nflow_control = \"hardware\"");
    let c = Config::from_toml(&ok, "t").unwrap();
    assert_eq!(c.sources.serial[0].baud_rate, 115_200);
    assert_eq!(c.sources.serial[0].parity, Parity::Even);
    let bad = MINIMAL.replace(
        "[sources.demo]",
        "[[sources.serial]]\npath = \"/dev/ttyS0\"\nstop_bits = 3",
    );
    assert_eq!(
        error_of(&bad),
        "invalid config: `sources.serial.stop_bits` = 3: 1 or 2"
    );
    let twice = MINIMAL.replace(
        "[sources.demo]",
        "[[sources.serial]]\npath = \"/dev/ttyS0\"\n[[sources.serial]]\npath = \"/dev/ttyS0\"",
    );
    assert!(error_of(&twice).contains("each port only once"));
    let parity = MINIMAL.replace(
        "[sources.demo]",
        "[[sources.serial]]\npath = \"/dev/ttyS0\"\nparity = \"mark\"",
    );
    assert!(
        error_of(&parity).contains("unknown variant `mark`"),
        "{}",
        error_of(&parity)
    );
}

#[test]
fn kafka_password_must_come_from_a_file() {
    let text = format!("{MINIMAL}\n[kafka.librdkafka_options]\n\"sasl.password\" = \"hunter2\"\n");
    let err = error_of(&text);
    assert!(err.contains("kafka.sasl_password_file"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the secret must not be echoed: {err}"
    );
}

#[test]
fn demo_device_prefix_is_checked() {
    let ok = MINIMAL.replace(
        "[sources.demo]",
        "[sources.demo]\ndevice_prefix = \"gw2.sim-\"",
    );
    let c = Config::from_toml(&ok, "t").unwrap();
    assert_eq!(c.sources.demo.unwrap().device_prefix, "gw2.sim-");
    let bad = MINIMAL.replace("[sources.demo]", "[sources.demo]\ndevice_prefix = \"a/b-\"");
    assert_eq!(
        error_of(&bad),
        "invalid config: `sources.demo.device_prefix` = \"a/b-\": 0 to 58 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
    );
}

#[test]
fn registry_device_types_alerts_and_http_are_checked() {
    let ok = format!(
        "{MINIMAL}\n[registry]\nfile = \"registry.json\"\nunknown_device = \"reject\"\n\
         [device_types.tracker]\nranges.temperature = [-40.0, 85.0]\nthresholds.speed = [0.0, 120.0]\n\
         [alerts]\nthreshold_readings = 5\n[http]\nlisten = \"\"\n"
    );
    let c = Config::from_toml(&ok, "t").unwrap();
    assert_eq!(c.registry.unknown_device, UnknownDevice::Reject);
    assert_eq!(
        c.device_types["tracker"].ranges.temperature,
        Some([-40.0, 85.0])
    );
    assert_eq!(c.alerts.threshold_readings, 5);
    let inverted = format!("{MINIMAL}\n[device_types.tracker]\nthresholds.speed = [10.0, 1.0]\n");
    assert_eq!(
        error_of(&inverted),
        "invalid config: `device_types` = tracker.thresholds.speed = [10.0, 1.0]: [min, max] with finite numbers and min <= max"
    );
    let policy = format!("{MINIMAL}\n[registry]\nunknown_device = \"maybe\"\n");
    assert!(error_of(&policy).contains("unknown variant `maybe`"));
    let listen = format!("{MINIMAL}\n[http]\nlisten = \"localhost\"\n");
    assert!(error_of(&listen).starts_with("invalid config: `http.listen` = \"localhost\""));
    let field = format!("{MINIMAL}\n[device_types.t]\nranges.pressure = [0.0, 1.0]\n");
    assert!(
        error_of(&field).contains("unknown field `pressure`"),
        "{}",
        error_of(&field)
    );
}

#[test]
fn cloud_sync_is_off_by_default_and_gets_documented_defaults() {
    assert!(
        Config::from_toml(MINIMAL, "t")
            .unwrap()
            .cloud_sync
            .is_none()
    );
    let c = Config::from_toml(
        &format!(
            "{MINIMAL}\n[cloud_sync]\nurl = \"https://bridge.example.com:8080/\"\ntoken_file = \"/etc/edge-agent/registry.token\"\n"
        ),
        "t",
    )
    .unwrap();
    let s = c.cloud_sync.unwrap();
    assert_eq!((s.interval_seconds, s.timeout_seconds), (60, 30));
    assert_eq!(s.base_url(), "https://bridge.example.com:8080");
    assert_eq!(s.ca_file, None);
    // `interval_secs` and `timeout_secs` are accepted as aliases.
    let c = Config::from_toml(
        &format!(
            "{MINIMAL}\n[cloud_sync]\nurl = \"http://b:8080\"\ntoken_file = \"t\"\ninterval_secs = 5\ntimeout_secs = 600\n"
        ),
        "t",
    )
    .unwrap();
    let s = c.cloud_sync.unwrap();
    assert_eq!((s.interval_seconds, s.timeout_seconds), (5, 600));
}

#[test]
fn cloud_sync_values_are_checked() {
    let sync = |body: &str| {
        error_of(&format!(
            "{MINIMAL}\n[cloud_sync]\ntoken_file = \"/etc/edge-agent/registry.token\"\n{body}\n"
        ))
    };
    assert_eq!(
        sync("url = \"ftp://bridge\""),
        "invalid config: `cloud_sync.url` = \"ftp://bridge\": an http:// or https:// URL such as https://bridge.example.com:8080"
    );
    assert!(
        sync("url = \"bridge:8080\"").starts_with(
            "invalid config: `cloud_sync.url` = \"bridge:8080\": an http:// or https:// URL"
        ),
        "{}",
        sync("url = \"bridge:8080\"")
    );
    let e = sync("url = \"https://gw:hunter2@bridge\"");
    assert!(e.contains("without user or password"), "{e}");
    assert!(!e.contains("hunter2"), "the secret must not be echoed: {e}");
    assert_eq!(
        sync("url = \"https://bridge/?x=1\""),
        "invalid config: `cloud_sync.url` = \"https://bridge/?x=1\": the bridge's base URL, without ?query or #fragment"
    );
    assert_eq!(
        sync("url = \"https://bridge\"\ninterval_seconds = 4"),
        "invalid config: `cloud_sync.interval_seconds` = 4: 5 to 86400"
    );
    assert_eq!(
        sync("url = \"https://bridge\"\ntimeout_seconds = 601"),
        "invalid config: `cloud_sync.timeout_seconds` = 601: 1 to 600"
    );
    assert_eq!(
        sync("url = \"http://bridge\"\nca_file = \"/etc/ca.pem\""),
        "invalid config: `cloud_sync.ca_file` = \"/etc/ca.pem\": only used with an https:// cloud_sync.url: remove it or switch the URL to https"
    );
    assert!(sync("url = \"https://bridge\"\ninterval = 5").contains("unknown field `interval`"));
    let missing = error_of(&format!(
        "{MINIMAL}\n[cloud_sync]\nurl = \"https://bridge\"\n"
    ));
    assert!(missing.contains("missing field `token_file`"), "{missing}");
}

#[test]
fn cloud_sync_and_a_registry_file_exclude_each_other() {
    let text = format!(
        "{MINIMAL}\n[registry]\nfile = \"/etc/edge-agent/registry.json\"\n\
         [cloud_sync]\nurl = \"https://bridge\"\ntoken_file = \"/etc/edge-agent/registry.token\"\n"
    );
    assert_eq!(
        error_of(&text),
        "invalid config: `registry.file` = \"/etc/edge-agent/registry.json\": not together with [cloud_sync], \
         which manages the registry: remove registry.file to sync from the cloud, or remove [cloud_sync] to keep the file"
    );
}
