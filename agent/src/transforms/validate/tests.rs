use super::*;

const NOW: i64 = 1_790_000_000_000;

fn limits() -> ValidationConfig {
    ValidationConfig::default()
}

fn good() -> Value {
    serde_json::json!({
        "device_id": "dev-1", "seq": 7, "ts": NOW - 1000,
        "temperature": 21.5, "humidity": 40.0, "battery": 88.0,
        "lat": 52.52, "lon": 13.40, "speed": 3.5
    })
}

fn decode(v: &Value) -> Result<Reading, Rejection> {
    decode_reading(v.to_string().as_bytes(), Some("dev-1"), NOW, &limits())
}

fn reason(v: &Value) -> RejectReason {
    decode(v).unwrap_err().reason
}

#[test]
fn valid_reading_decodes() {
    let r = decode(&good()).unwrap();
    assert_eq!(r.device_id, "dev-1");
    assert_eq!(r.seq, 7);
    assert_eq!(r.device_seq, 7);
    assert_eq!(r.temperature, 21.5);
    assert!(r.attributes.is_empty());
}

#[test]
fn extra_fields_are_kept_as_attributes() {
    let mut v = good();
    v["firmware"] = "1.2.3".into();
    v["attributes"] = serde_json::json!({"rssi": -70});
    let r = decode(&v).unwrap();
    assert_eq!(r.attributes["firmware"], "1.2.3");
    assert_eq!(r.attributes["rssi"], -70);
}

#[test]
fn epoch_is_folded_into_the_key() {
    let mut v = good();
    v["epoch"] = 3.into();
    let r = decode(&v).unwrap();
    assert_eq!(r.seq, (3 << 32) | 7);
    assert_eq!(r.device_seq, 7);
    assert_eq!(r.epoch, Some(3));
    v["seq"] = (u32::MAX as u64 + 1).into();
    assert_eq!(reason(&v), RejectReason::OutOfRange);
}

#[test]
fn numbers_as_strings_are_wrong_type() {
    let mut v = good();
    v["temperature"] = "21.5".into();
    let err = decode(&v).unwrap_err();
    assert_eq!(err.reason, RejectReason::WrongType);
    assert_eq!(
        err.message,
        "field `temperature` must be a number, got a string"
    );
    let mut v = good();
    v["seq"] = "7".into();
    assert_eq!(reason(&v), RejectReason::WrongType);
    let mut v = good();
    v["seq"] = (-1).into();
    assert_eq!(reason(&v), RejectReason::WrongType);
    let mut v = good();
    v["ts"] = 1.5.into();
    assert_eq!(reason(&v), RejectReason::WrongType);
}

#[test]
fn missing_fields() {
    for field in [
        "device_id",
        "seq",
        "ts",
        "temperature",
        "humidity",
        "battery",
        "lat",
        "lon",
        "speed",
    ] {
        let mut v = good();
        v.as_object_mut().unwrap().remove(field);
        let err = decode_reading(v.to_string().as_bytes(), None, NOW, &limits()).unwrap_err();
        assert_eq!(err.reason, RejectReason::MissingField, "{field}");
        assert!(err.message.contains(field), "{}", err.message);
    }
}

#[test]
fn ranges() {
    for (field, bad) in [
        ("lat", 91.0),
        ("lon", -180.5),
        ("humidity", 101.0),
        ("battery", -1.0),
        ("speed", -0.1),
    ] {
        let mut v = good();
        v[field] = bad.into();
        assert_eq!(reason(&v), RejectReason::OutOfRange, "{field}");
    }
}

#[test]
fn timestamp_skew() {
    let mut v = good();
    v["ts"] = (NOW + 301_000).into();
    assert_eq!(reason(&v), RejectReason::TimestampSkew);
    v["ts"] = (NOW - 31 * 24 * 3600 * 1000).into();
    assert_eq!(reason(&v), RejectReason::TimestampSkew);
}

#[test]
fn malformed_and_non_object_payloads() {
    let l = limits();
    for bad in [&b"{\"device_id\": "[..], b"", b"\xff\xfe", b"nul"] {
        assert_eq!(
            decode_reading(bad, None, NOW, &l).unwrap_err().reason,
            RejectReason::MalformedJson
        );
    }
    assert_eq!(
        decode_reading(b"[1,2]", None, NOW, &l).unwrap_err().reason,
        RejectReason::NotAnObject
    );
    assert_eq!(
        decode_reading(b"42", None, NOW, &l).unwrap_err().reason,
        RejectReason::NotAnObject
    );
}

#[test]
fn oversized_payload_is_rejected_before_parsing() {
    let big = vec![b' '; limits().max_payload_bytes + 1];
    let err = decode_reading(&big, None, NOW, &limits()).unwrap_err();
    assert_eq!(err.reason, RejectReason::PayloadTooLarge);
    assert!(err.message.contains("4097 bytes"), "{}", err.message);
}

#[test]
fn device_id_must_match_topic_and_be_safe() {
    let mut v = good();
    v["device_id"] = "dev-2".into();
    assert_eq!(reason(&v), RejectReason::DeviceIdMismatch);
    v["device_id"] = "bad id".into();
    assert_eq!(reason(&v), RejectReason::InvalidDeviceId);
}

#[test]
fn topics() {
    assert_eq!(
        parse_topic("", "devices/d1/telemetry"),
        Ok(TopicKind::Telemetry("d1"))
    );
    assert_eq!(
        parse_topic("", "devices/d1/telemetry/bin"),
        Ok(TopicKind::TelemetryBin("d1"))
    );
    assert_eq!(
        parse_topic("site/", "site/devices/d1/telemetry"),
        Ok(TopicKind::Telemetry("d1"))
    );
    for bad in [
        "devices/d1/status",
        "devices/d1",
        "devices/d1/telemetry/x/y",
        "other/d1/telemetry",
        "site/devices/d1/telemetry",
    ] {
        assert_eq!(
            parse_topic("", bad).unwrap_err().reason,
            RejectReason::UnknownTopic,
            "{bad}"
        );
    }
    assert_eq!(
        parse_topic("", "devices/a b/telemetry").unwrap_err().reason,
        RejectReason::InvalidDeviceId
    );
}

#[test]
fn reason_codes_round_trip() {
    for r in RejectReason::ALL {
        assert_eq!(RejectReason::from_code(r.code()), Some(r));
    }
}

#[test]
fn enriched_record_flattens_the_reading() {
    let r = decode(&good()).unwrap();
    let json = serde_json::to_value(EnrichedRecord::new(&r, None, "gw", NOW)).unwrap();
    assert_eq!(json["device_id"], "dev-1");
    assert_eq!(json["seq"], 7);
    assert_eq!(json["gateway_id"], "gw");
    assert_eq!(json["registered"], false);
    assert!(json.get("attributes").is_none());
    assert!(json.get("device_type").is_none());
    let meta: crate::registry::DeviceMeta = serde_json::from_str(
        r#"{"device_id": "dev-1", "device_type": "tracker", "name": "Truck 7", "site": "north", "tags": {"fleet": "a"}}"#,
    )
    .unwrap();
    let json = serde_json::to_value(EnrichedRecord::new(&r, Some(&meta), "gw", NOW)).unwrap();
    assert_eq!(json["registered"], true);
    assert_eq!(json["device_type"], "tracker");
    assert_eq!(json["device_name"], "Truck 7");
    assert_eq!(json["site"], "north");
    assert_eq!(json["tags"]["fleet"], "a");
}

/// The fast path and the general path agree on every input: valid ones,
/// each field missing or of each wrong type, extras, escapes, duplicates.
#[test]
fn fast_and_general_paths_agree() {
    let odd_values: Vec<Value> = vec![
        Value::Null,
        "20".into(),
        "dev-1".into(),
        1.5.into(),
        0.into(),
        (-1).into(),
        u64::MAX.into(),
        i64::MIN.into(),
        1e300.into(),
        true.into(),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!({"k": 1}),
    ];
    let mut payloads: Vec<String> = Vec::new();
    let mut with_epoch = good();
    with_epoch["epoch"] = 5.into();
    for base in [good(), with_epoch] {
        payloads.push(base.to_string());
        let fields: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        for field in fields
            .iter()
            .chain(["epoch".to_string(), "attributes".to_string()].iter())
        {
            let mut v = base.clone();
            v.as_object_mut().unwrap().remove(field);
            payloads.push(v.to_string());
            for odd in &odd_values {
                let mut v = base.clone();
                v[field.as_str()] = odd.clone();
                payloads.push(v.to_string());
            }
        }
        let mut v = base.clone();
        v["firmware"] = "1.2".into();
        v["attributes"] = serde_json::json!({"firmware": "0.9", "rssi": -70});
        payloads.push(v.to_string());
    }
    let text = good().to_string();
    let inner = &text[1..text.len() - 1];
    payloads.extend([
        // Duplicate keys: the last counts.
        format!("{{{inner},\"seq\":9}}"),
        format!("{{{inner},\"x\":1,\"x\":2}}"),
        format!("{{{inner},\"attributes\":{{\"a\":1}},\"attributes\":null}}"),
        // Escapes.
        text.replace("\"dev-1\"", "\"dev\\u002d1\""),
        text.replace("\"device_id\"", "\"device\\u005fid\""),
        // Not objects, broken, trailing data, deep nesting.
        "[]".into(),
        "null".into(),
        "{".into(),
        format!("{text} {{}}"),
        format!(
            "{{{inner},\"deep\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        ),
        String::new(),
    ]);
    for p in &payloads {
        for topic in [None, Some("dev-1"), Some("dev-2")] {
            assert_eq!(
                decode_reading(p.as_bytes(), topic, NOW, &limits()),
                decode_reading_general(p.as_bytes(), topic, NOW, &limits()),
                "payload {p} topic {topic:?}"
            );
        }
    }
    assert!(payloads.len() > 300);
}

#[test]
fn hand_written_json_equals_serde_json() {
    let mut with_extras = good();
    with_extras["epoch"] = 3.into();
    with_extras["note"] = "quote \" and \\ and \u{1}".into();
    with_extras["attributes"] = serde_json::json!({"rssi": -70, "nested": {"a": [1, 2.5]}});
    with_extras["temperature"] = (-0.000123).into();
    with_extras["humidity"] = 1e-7.into();
    let meta: crate::registry::DeviceMeta = serde_json::from_str(
        r#"{"device_id": "dev-1", "device_type": "tracker", "name": "Truck \"7\"", "site": "nörth", "tags": {"fleet": "a\nb"}}"#,
    )
    .unwrap();
    for v in [good(), with_extras] {
        let r = decode(&v).unwrap();
        for meta in [None, Some(&meta)] {
            let record = EnrichedRecord::new(&r, meta, "gw-1", NOW);
            let mut ours = Vec::new();
            record.write_json(&mut ours);
            let ours: Value = serde_json::from_slice(&ours).expect("valid JSON");
            assert_eq!(ours, serde_json::to_value(&record).unwrap());
        }
    }
}
