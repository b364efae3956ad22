use super::*;

/// A square fence around (lat 48.5, lon 11.5) with a hole in the middle,
/// and a two-part MultiPolygon fence elsewhere.
pub(crate) fn fences_json() -> serde_json::Value {
    serde_json::json!({
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature",
             "properties": {"id": "yard", "dwell_seconds": 60, "absent_seconds": 120},
             "geometry": {"type": "Polygon", "coordinates": [
                 [[11.0, 48.0], [12.0, 48.0], [12.0, 49.0], [11.0, 49.0], [11.0, 48.0]],
                 [[11.4, 48.4], [11.6, 48.4], [11.6, 48.6], [11.4, 48.6], [11.4, 48.4]]
             ]}},
            {"type": "Feature",
             "properties": {"id": "depots"},
             "geometry": {"type": "MultiPolygon", "coordinates": [
                 [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]],
                 [[[5.0, 5.0], [6.0, 5.0], [6.0, 6.0], [5.0, 6.0], [5.0, 5.0]]]
             ]}}
        ]
    })
}

pub(crate) fn document() -> serde_json::Value {
    serde_json::json!({
        "version": "2026-11-26.1",
        "devices": [
            {"device_id": "truck-1", "device_type": "tracker", "name": "Truck 1", "site": "north",
             "tags": {"fleet": "a"}, "ranges": {"temperature": [-20.0, 60.0]},
             "thresholds": {"speed": [0.0, 80.0]}, "threshold_readings": 2},
            {"device_id": "sensor-9"}
        ],
        "fences": fences_json()
    })
}

fn error_of(doc: serde_json::Value) -> String {
    parse_registry(&doc.to_string()).unwrap_err().to_string()
}

#[test]
fn a_valid_document_parses() {
    let r = parse_registry(&document().to_string()).unwrap();
    assert_eq!(r.version, "2026-11-26.1");
    assert_eq!(r.devices.len(), 2);
    assert_eq!(r.devices[0].ranges.temperature, Some([-20.0, 60.0]));
    assert_eq!(r.fences.len(), 2);
    assert_eq!(r.fences[0].dwell_ms, Some(60_000));
}

#[test]
fn bad_documents_are_refused_as_a_whole_with_the_reason() {
    assert!(
        parse_registry("{\"version\": ")
            .unwrap_err()
            .to_string()
            .starts_with("registry is not valid: EOF")
    );
    let mut d = document();
    d["colour"] = "blue".into();
    assert!(error_of(d).contains("unknown field `colour`"));

    for bad_id in [
        "",
        "x'; DROP TABLE registry_device; --",
        "dev/#",
        "dev+",
        &"a".repeat(65),
    ] {
        let mut d = document();
        d["devices"][1]["device_id"] = bad_id.into();
        let e = error_of(d);
        assert!(e.contains("registry device 1"), "{e}");
        assert!(e.contains("device_id must be 1 to 64 characters"), "{e}");
    }
    let mut d = document();
    d["devices"][1]["device_id"] = "truck-1".into();
    assert_eq!(error_of(d), "registry device 1 (\"truck-1\"): listed twice");
    let mut d = document();
    d["devices"][0]["ranges"]["temperature"] = serde_json::json!([60.0, -20.0]);
    assert!(error_of(d).contains("ranges.temperature = [60.0, -20.0]"));
    let mut d = document();
    d["devices"][0]["thresholds"]["pressure"] = serde_json::json!([0.0, 1.0]);
    assert!(error_of(d).contains("unknown field `pressure`"));
    let mut d = document();
    d["devices"][0]["temperature"] = serde_json::json!("20");
    assert!(error_of(d).contains("unknown field `temperature`"));
    let mut d = document();
    d["devices"][0]["threshold_readings"] = 0.into();
    assert!(error_of(d).contains("threshold_readings must be 1 to 10000"));
    let mut d = document();
    let tags: serde_json::Map<String, serde_json::Value> =
        (0..40).map(|i| (format!("t{i}"), "v".into())).collect();
    d["devices"][0]["tags"] = tags.into();
    assert!(error_of(d).contains("more than 32 tags"));
    let mut d = document();
    d["version"] = "".into();
    assert!(error_of(d).contains("`version` must be 1 to 128"));
}

#[test]
fn invalid_polygons_refuse_the_registry() {
    // Self-intersecting (a bow tie).
    let mut d = document();
    d["fences"]["features"][1]["geometry"] = serde_json::json!({"type": "Polygon", "coordinates": [
        [[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]});
    let e = error_of(d);
    assert!(e.starts_with("registry fences: feature 1:"), "{e}");
    assert!(e.contains("not a valid polygon"), "{e}");
    // Unclosed ring.
    let mut d = document();
    d["fences"]["features"][1]["geometry"] = serde_json::json!({"type": "Polygon", "coordinates": [
        [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]]]});
    assert!(error_of(d).contains("feature 1"));
    // Too many vertices.
    let n = crate::transforms::geofence::MAX_FENCE_VERTICES + 10;
    let mut ring: Vec<[f64; 2]> = (0..n)
        .map(|i| {
            let a = i as f64 / n as f64 * std::f64::consts::TAU;
            [a.cos(), a.sin()]
        })
        .collect();
    ring.push(ring[0]);
    let mut d = document();
    d["fences"]["features"][0]["geometry"] =
        serde_json::json!({"type": "Polygon", "coordinates": [ring]});
    assert!(error_of(d).contains("feature 0"));
    // Not a FeatureCollection.
    let mut d = document();
    d["fences"] = serde_json::json!({"type": "Polygon"});
    assert!(error_of(d).contains("FeatureCollection"));
}

fn db() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("r.db")).unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    (dir, conn)
}

#[test]
fn apply_replaces_everything_and_bumps_the_generation() {
    let (_dir, mut conn) = db();
    assert_eq!(generation(&conn).unwrap(), 0);
    assert!(current(&conn).unwrap().is_none());
    assert!(load_fences(&conn).unwrap().is_empty());
    let r = parse_registry(&document().to_string()).unwrap();
    assert_eq!(apply(&mut conn, &r, "test", "h1", 5).unwrap(), 1);
    let meta = lookup(&conn, "truck-1").unwrap().unwrap();
    assert_eq!(meta, r.devices[0]);
    assert!(lookup(&conn, "nobody").unwrap().is_none());
    assert_eq!(load_fences(&conn).unwrap().len(), 2);

    let mut d = document();
    d["version"] = "2".into();
    d["devices"] = serde_json::json!([{"device_id": "sensor-9"}]);
    d["fences"]["features"] = serde_json::json!([]);
    let r2 = parse_registry(&d.to_string()).unwrap();
    assert_eq!(apply(&mut conn, &r2, "test", "h2", 6).unwrap(), 2);
    assert!(lookup(&conn, "truck-1").unwrap().is_none());
    assert!(load_fences(&conn).unwrap().is_empty());
    let info = current(&conn).unwrap().unwrap();
    assert_eq!(
        (
            info.generation,
            info.version.as_str(),
            info.devices,
            info.fences
        ),
        (2, "2", 1, 0)
    );
}

#[test]
fn a_bad_file_keeps_the_last_good_copy_and_an_unchanged_file_is_not_reapplied() {
    let (dir, mut conn) = db();
    let path = dir.path().join("registry.json");
    std::fs::write(&path, document().to_string()).unwrap();
    let policy = crate::config::UnknownDevice::Pass;
    let first = apply_file_at_start(&mut conn, &path, policy, 1)
        .unwrap()
        .unwrap();
    assert_eq!((first.generation, first.devices), (1, 2));
    // Same content: not applied again.
    let again = apply_file_at_start(&mut conn, &path, policy, 2)
        .unwrap()
        .unwrap();
    assert_eq!(again, first);
    // Broken file: refused, last good copy stays.
    std::fs::write(&path, "{\"version\": \"3\", \"devices\": [").unwrap();
    let kept = apply_file_at_start(&mut conn, &path, policy, 3)
        .unwrap()
        .unwrap();
    assert_eq!(kept, first);
    assert!(lookup(&conn, "truck-1").unwrap().is_some());
    // Missing file: the same.
    std::fs::remove_file(&path).unwrap();
    let kept = apply_file_at_start(&mut conn, &path, policy, 4)
        .unwrap()
        .unwrap();
    assert_eq!(kept, first);
    // A changed valid file is applied.
    let mut d = document();
    d["version"] = "4".into();
    std::fs::write(&path, d.to_string()).unwrap();
    let next = apply_file_at_start(&mut conn, &path, policy, 5)
        .unwrap()
        .unwrap();
    assert_eq!((next.generation, next.version.as_str()), (2, "4"));
}

#[test]
fn cache_is_bounded_and_counts_hits_and_misses() {
    let mut cache = DeviceCache::new(10);
    assert_eq!(cache.get("a"), None);
    cache.insert("a", None);
    assert_eq!(cache.get("a"), Some(None));
    assert_eq!((cache.hits, cache.misses), (1, 1));
    for i in 0..1000 {
        cache.insert(&format!("d{i}"), None);
        assert!(cache.len() <= 10, "{} entries", cache.len());
    }
    // Recently used entries survive a rotation.
    cache.insert("keep", None);
    for i in 0..4 {
        cache.insert(&format!("e{i}"), None);
    }
    assert_eq!(cache.get("keep"), Some(None));
    cache.clear();
    assert!(cache.is_empty());
    // Ids on both sides of the inline key limit (24 bytes), and the longest
    // allowed (64 bytes).
    let ids = ["k".repeat(24), "k".repeat(25), "k".repeat(64)];
    for id in &ids {
        assert_eq!(cache.get(id), None);
        cache.insert(id, None);
    }
    for id in &ids {
        assert_eq!(cache.get(id), Some(None), "{id}");
    }
    assert_eq!(cache.get(&"k".repeat(23)), None);
    // `peek` answers without counting.
    let counted = (cache.hits, cache.misses);
    let meta: DeviceMeta = serde_json::from_str(r#"{"device_id": "known"}"#).unwrap();
    let known = Arc::new(CachedDevice::new(&meta));
    cache.insert("known", Some(known.clone()));
    assert!(cache.peek("known").is_some());
    assert!(cache.peek(&ids[2]).is_none(), "known to be unknown");
    assert!(cache.peek("nobody").is_none());
    assert_eq!((cache.hits, cache.misses), counted);
}
