use super::*;

const NOW: i64 = 1_790_000_000_000;

/// A reproducible stream of pseudo-random words (xorshift64).
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

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

/// Number texts and layouts the scanner reads itself or leaves to the serde
/// paths: every path gives the same result.
#[test]
fn scanner_agrees_with_the_serde_paths() {
    let text = good().to_string();
    // The common shape takes the scanner.
    assert!(scan::parts(text.as_bytes()).is_some());
    let spaced = " {\n\t\"device_id\" : \"dev-1\" , \"seq\":7,\"epoch\": null, \"ts\": 1789999999000,\r\n\
                  \"temperature\":21.5,\"humidity\":40,\"battery\":88.0,\"lat\":52.52,\"lon\":-13.4,\"speed\":0 } \n";
    assert!(scan::parts(spaced.as_bytes()).is_some());
    let numbers = [
        "0",
        "-0",
        "-0.0",
        "1",
        "01",
        "1.",
        ".5",
        "+1",
        "1.50",
        "1e2",
        "1E+2",
        "2.5e-1",
        "1e",
        "1e+",
        "-",
        "--1",
        "1.2.3",
        "0x10",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "4.9e-324",
        "21.500000000000000001",
        "52.520000000000003126388037344440817832946777343750001",
        "0.1000000000000000055511151231257827021181583404541015625",
        "9007199254740993",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "1789999999000",
        "1789999999000.0",
        "1.789999999e12",
        "true",
        "null",
        "\"7\"",
        "",
    ];
    let mut payloads = vec![text.clone(), spaced.to_string()];
    let with_epoch = format!("{{\"epoch\":5,{}", &text[1..]);
    // The numeric fields.
    for field in KNOWN_FIELDS
        .into_iter()
        .filter(|f| !matches!(*f, "device_id" | "attributes"))
    {
        let at = with_epoch.find(&format!("\"{field}\":")).unwrap() + field.len() + 3;
        let end = at + with_epoch[at..].find([',', '}']).unwrap();
        for number in numbers {
            payloads.push(format!(
                "{}{number}{}",
                &with_epoch[..at],
                &with_epoch[end..]
            ));
        }
    }
    let inner = &text[1..text.len() - 1];
    payloads.extend([
        format!("{{{inner},\"epoch\":3,\"epoch\":null}}"),
        format!("{{{inner},}}"),
        format!("{{,{inner}}}"),
        format!("{{{inner}}}x"),
        format!("{{{inner}}},"),
        format!("{{{inner}"),
        format!("{{{inner};"),
        format!("{{{inner},\"attributes\":{{}}}}"),
        format!("{{{inner},\"Seq\":1}}"),
        // Keys that share a first letter or a prefix with the schema's.
        text.replace("\"seq\"", "\"se\""),
        text.replace("\"seq\"", "\"seqs\""),
        text.replace("\"seq\"", "\"s\""),
        text.replace("\"ts\"", "\"t\""),
        text.replace("\"ts\"", "\"tsx\""),
        text.replace("\"temperature\"", "\"temperatur\""),
        text.replace("\"lat\"", "\"la\""),
        text.replace("\"lon\"", "\"lo\""),
        text.replace("\"lon\"", "\"long\""),
        text.replace("\"speed\"", "\"spee\""),
        with_epoch.replace("\"epoch\"", "\"epochs\""),
        with_epoch.replace("\"epoch\"", "\"e\""),
        text.replace("\"device_id\"", "\"device_i\""),
        text.replace("\"battery\"", "\"batteryy\""),
        text.replace("\"humidity\"", "\"h\""),
        text.replace("\"dev-1\"", "\"dév-1\""),
        text.replace("\"dev-1\"", "\"dev\t1\""),
        text.replace("\"dev-1\"", "\"\""),
        text.replace("\"dev-1\"", "7"),
        text.replace("\"device_id\"", "device_id"),
        text.replace(':', " : "),
        text.replace(',', " ,\n"),
        "{}".into(),
        " ".into(),
    ]);
    for p in &payloads {
        for topic in [None, Some("dev-1"), Some("dev-2")] {
            assert_eq!(
                decode_reading(p.as_bytes(), topic, NOW, &limits()),
                decode_reading_general(p.as_bytes(), topic, NOW, &limits()),
                "payload {p:?} topic {topic:?}"
            );
        }
    }
    // Each number the scanner reads is the one serde_json reads.
    for number in [
        "21.5",
        "1e2",
        "-0.0",
        "4.9e-324",
        "0.30000000000000004",
        "52.520000000000003126388037344440817832946777343750001",
    ] {
        let p = text.replace("21.5", number);
        let scanned = scan::parts(p.as_bytes()).expect(number).temperature;
        let parsed: f64 = serde_json::from_str(number).unwrap();
        assert_eq!(scanned.to_bits(), parsed.to_bits(), "{number}");
    }
}

/// The scanner notes how many decimals each value's text had; numbers it
/// leaves to the standard library, and the serde paths, note none.
#[test]
fn the_scanner_notes_each_values_decimals() {
    let unknown = Decimals::UNKNOWN;
    let text = good().to_string();
    for (number, decimals) in [
        ("21.5", 1),
        ("21.50", 2),
        ("-0.0", 1),
        ("0", 0),
        ("100", 0),
        ("0.000000000000000001", 18),
        ("1e2", unknown),
        ("2.5e-1", unknown),
        ("21.00000000000000000001", unknown),
        (
            "52.520000000000003126388037344440817832946777343750001",
            unknown,
        ),
    ] {
        let p = text.replace("21.5", number);
        let parts = scan::parts(p.as_bytes()).expect(number);
        assert_eq!(parts.decimals.0[0], decimals, "{number}");
        let r = decode_reading(p.as_bytes(), None, NOW, &limits()).expect(number);
        assert_eq!(r.decimals.0[0], decimals, "{number}");
    }
    let r = decode_reading(text.as_bytes(), None, NOW, &limits()).unwrap();
    let all: Vec<u8> = r.decimals.0.to_vec();
    let expected: Vec<u8> = ["temperature", "humidity", "battery", "lat", "lon", "speed"]
        .iter()
        .map(|field| {
            let v = &good()[field];
            let t = v.to_string();
            t.split_once('.').map_or(0, |(_, frac)| frac.len() as u8)
        })
        .collect();
    assert_eq!(all, expected, "{text}");
    // The general path knows no decimals (a key out of the common shape
    // sends the payload there).
    let mut general = good();
    general["attributes"] = serde_json::json!({"a": 1});
    let r = decode_reading(general.to_string().as_bytes(), None, NOW, &limits()).unwrap();
    assert_eq!(r.decimals.0, [unknown; 6]);
}

/// The scanner's exact division gives the bits of a full parser on
/// numbers of every length and scale it takes.
#[test]
fn exact_floats_equal_the_full_parser() {
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut taken = 0;
    for _ in 0..200_000 {
        let digits = 1 + next() % 19;
        let mantissa = next() % 10u64.pow(digits as u32);
        let text = mantissa.to_string();
        let point = (next() % (text.len() as u64 + 2)) as usize;
        let mut number = if point == 0 || point > text.len() {
            text.clone()
        } else {
            format!("{}.{}", &text[..point], &text[point..])
        };
        if point == 1 && next().is_multiple_of(2) {
            number = format!("0.{}{text}", "0".repeat((next() % 8) as usize));
        }
        if next().is_multiple_of(2) {
            number.insert(0, '-');
        }
        let full: f64 = number.parse().unwrap();
        if let Some(value) = scan::exact_float(number.as_bytes()) {
            taken += 1;
            assert_eq!(value.to_bits(), full.to_bits(), "{number}");
        } else {
            // Only what is not JSON ("12.") or has more than 19 digits is
            // left to the full parser.
            let digits = number.bytes().filter(u8::is_ascii_digit).count();
            assert!(number.ends_with('.') || digits > 19, "{number}");
        }
    }
    assert!(taken > 150_000, "{taken}");
    // Halfway cases and their neighbours, to the last bit.
    for number in [
        "9007199254740993",
        "9007199254740995",
        "18014398509481985",
        "18014398509481987",
        "4503599627370496.5",
        "4503599627370497.5",
        "4503599627370496.499",
        "4503599627370496.501",
        "9007199254740993.001",
        "9007199254740992.999",
        "9007199254740994.999",
        // The quotient's dropped bits are exactly one half and the division
        // left a remainder: above half, so rounded up.
        "4.098330827953585942",
        "1.316247983396613086",
        "4.860775161356663876",
        "4503599627370496.50000000000000001",
        "2251799813685248.25",
        "2251799813685248.75",
        "1125899906842624.125",
        "1125899906842624.375",
        "9999999999999999999",
        "0.9999999999999999999",
        "1.000000000000000011",
        "57.304498082551675",
        "20.500880642847456",
        "0.000000000000000001",
        "12345678901234567.89",
    ] {
        let full: f64 = number.parse().unwrap();
        match scan::exact_float(number.as_bytes()) {
            Some(value) => assert_eq!(value.to_bits(), full.to_bits(), "{number}"),
            None => assert!(number.len() > 20, "{number} left to the full parser"),
        }
    }
    assert_eq!(scan::exact_float(b"1e5"), None);
    assert_eq!(scan::exact_float(b"0.00000000000000000000001"), None);
}

/// The multiplication by a reciprocal gives the bits of the full parser
/// for every mantissa length and 1 to 22 decimals, and on the cases where
/// it must decide a tie (exactly halfway between two floats) or look at
/// the reciprocal's low half.
#[test]
fn scaled_down_equals_the_full_parser() {
    let check = |mantissa: u64, decimals: usize| {
        let digits = mantissa.to_string();
        let text = if digits.len() > decimals {
            let (int, frac) = digits.split_at(digits.len() - decimals);
            format!("{int}.{frac}")
        } else {
            format!("0.{}{digits}", "0".repeat(decimals - digits.len()))
        };
        let full: f64 = text.parse().unwrap();
        let scaled = scan::scaled_down(mantissa, decimals);
        assert_eq!(
            scaled.to_bits(),
            full.to_bits(),
            "{text}: {scaled} against {full}"
        );
    };
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..500_000 {
        let mantissa = match next() % 4 {
            // Any 64-bit value, and values of every length.
            0 => next().max(1),
            _ => (next() % 10u64.pow(1 + (next() % 19) as u32)).max(1),
        };
        check(mantissa, 1 + (next() % 22) as usize);
    }
    // Ties: (2j + 1) / 2^(s + 1) next to floats of spacing 2^-s is
    // (2j + 1) * 5^(s + 1) / 10^(s + 1); and their neighbours.
    for s in 0..4u32 {
        let five = 5u64.pow(s + 1);
        for _ in 0..20_000 {
            let odd = ((1u64 << (52 - s)) + next() % (1u64 << (52 - s))) * 2 + 1;
            let Some(mantissa) = odd.checked_mul(five) else {
                continue;
            };
            for m in [mantissa - 1, mantissa, mantissa + 1] {
                check(m, s as usize + 1);
            }
        }
    }
    // The extremes of the range.
    for decimals in 1..=22 {
        for mantissa in [1, 2, 9, 10, u64::MAX, u64::MAX - 1, 1 << 63, (1 << 53) + 1] {
            check(mantissa, decimals);
        }
    }
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

/// The eight-digit step of the float scanner: every byte value at every
/// position is told apart from a digit, and the value is the number.
#[test]
fn eight_digits_at_once() {
    let base = *b"12345678";
    assert!(scan::eight_digits(u64::from_le_bytes(base)));
    for at in 0..8 {
        for byte in 0..=255u8 {
            let mut text = base;
            text[at] = byte;
            assert_eq!(
                scan::eight_digits(u64::from_le_bytes(text)),
                byte.is_ascii_digit(),
                "byte {byte:#04x} at {at}"
            );
        }
    }
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..100_000 {
        let text = format!("{:08}", next() % 100_000_000);
        let word = u64::from_le_bytes(text.as_bytes().try_into().unwrap());
        assert!(scan::eight_digits(word), "{text}");
        assert_eq!(
            scan::value_of_eight_digits(word),
            text.parse::<u64>().unwrap(),
            "{text}"
        );
    }
}

/// The eight-byte step of the string scanner finds the first byte a plain
/// string may not hold: every byte value at every position, after plain
/// bytes and before any others, and random words.
#[test]
fn first_stop_of_a_plain_string() {
    let first_stop = |word: u64| {
        let stops = scan::not_plain(word);
        (stops != 0).then(|| stops.trailing_zeros() as usize / 8)
    };
    let expected = |bytes: &[u8; 8]| bytes.iter().position(|&b| !scan::plain(b));
    for at in 0..8 {
        for byte in 0..=255u8 {
            for after in [b'a', b'"', 0x00, 0x1f, 0xff, b'\\', 0x80] {
                let mut text = *b"dev-0001";
                text[at] = byte;
                for later in &mut text[at + 1..] {
                    *later = after;
                }
                assert_eq!(
                    first_stop(u64::from_le_bytes(text)),
                    expected(&text),
                    "{text:?}"
                );
            }
        }
    }
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    for _ in 0..200_000 {
        let state = next();
        let text = state.to_le_bytes();
        assert_eq!(first_stop(state), expected(&text), "{text:?}");
    }
    // Whole strings of every length up to 40 (so their closing quote at
    // every offset), and one more byte at every position.
    let payload = |id: &[u8]| {
        format!(
            "{{\"device_id\":\"{}\",\"seq\":1,\"ts\":1,\"temperature\":1,\"humidity\":1,\"battery\":1,\"lat\":1,\"lon\":1,\"speed\":1}}",
            String::from_utf8_lossy(id)
        )
    };
    for len in 0..40 {
        let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let read = |id: &[u8]| {
            scan::parts(payload(id).as_bytes()).map(|parts| parts.device_id.into_owned())
        };
        assert_eq!(
            read(&text).as_deref(),
            Some(std::str::from_utf8(&text).unwrap())
        );
        for extra in [b'\\', 0x01, 0x1f, 0xc3, b'~', 0x7f] {
            for at in 0..=len {
                let mut id = text.clone();
                id.insert(at, extra);
                let expected = scan::plain(extra).then(|| String::from_utf8(id.clone()).unwrap());
                assert_eq!(read(&id), expected, "{id:?}");
            }
        }
    }
}

/// The fraction step of the number scanner: every byte value at every
/// position ends the digits there, whatever follows, and the value is the
/// number the digits before it spell.
#[test]
fn digit_runs() {
    assert_eq!(
        scan::digit_run(u64::from_le_bytes(*b"12345678")),
        (8, 12_345_678)
    );
    for at in 0..8 {
        for byte in 0..=255u8 {
            for after in [b'9', b'0', 0x00, b'/', b':', 0xff, 0xba, b'.'] {
                let mut text = *b"12345678";
                text[at] = byte;
                for later in &mut text[at + 1..] {
                    *later = after;
                }
                let count = text.iter().position(|b| !b.is_ascii_digit()).unwrap_or(8);
                let value = std::str::from_utf8(&text[..count])
                    .unwrap()
                    .parse::<u64>()
                    .unwrap_or(0);
                assert_eq!(
                    scan::digit_run(u64::from_le_bytes(text)),
                    (count, value),
                    "{text:?}"
                );
            }
        }
    }
}

/// The device id of a decoded reading goes into a spare string when one is
/// given; rejected readings and ids with escapes leave the spares alone.
#[test]
fn a_spare_id_string_is_reused() {
    let text = good().to_string();
    let mut spare = vec![String::with_capacity(32)];
    let buffer = spare[0].as_ptr();
    let reading =
        decode_reading_reusing(text.as_bytes(), None, NOW, &limits(), &mut spare).unwrap();
    assert!(spare.is_empty());
    assert_eq!(reading.device_id.as_ptr(), buffer);
    assert_eq!(
        reading,
        decode_reading(text.as_bytes(), None, NOW, &limits()).unwrap()
    );

    spare.push(String::from("old contents"));
    let hot = text.replace("21.5", "1e9");
    assert!(decode_reading_reusing(hot.as_bytes(), None, NOW, &limits(), &mut spare).is_err());
    assert_eq!(spare, ["old contents"]);
    let escaped = text.replace("\"dev-1\"", "\"dev\\u002d1\"");
    let reading =
        decode_reading_reusing(escaped.as_bytes(), None, NOW, &limits(), &mut spare).unwrap();
    assert_eq!(reading.device_id, "dev-1");
    assert_eq!(spare, ["old contents"]);
}
