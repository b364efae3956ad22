use super::*;

/// A square around (lat 48.1, lon 11.5) with a hole in the middle, and a
/// two-part MultiPolygon to the east.
const FENCES: &str = r#"{
  "type": "FeatureCollection",
  "features": [
    {"type": "Feature",
     "properties": {"id": "yard", "dwell_seconds": 60, "absent_seconds": 120},
     "geometry": {"type": "Polygon", "coordinates": [
        [[11.49, 48.09], [11.51, 48.09], [11.51, 48.11], [11.49, 48.11], [11.49, 48.09]],
        [[11.499, 48.099], [11.501, 48.099], [11.501, 48.101], [11.499, 48.101], [11.499, 48.099]]
     ]}},
    {"type": "Feature",
     "properties": {"id": "depots"},
     "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[11.60, 48.09], [11.61, 48.09], [11.61, 48.10], [11.60, 48.10], [11.60, 48.09]]],
        [[[11.70, 48.09], [11.71, 48.09], [11.71, 48.10], [11.70, 48.10], [11.70, 48.09]]]
     ]}}
  ]
}"#;

fn index() -> FenceIndex {
    FenceIndex::new(parse_fences(FENCES).expect("valid fences"))
}

fn ids(fences: Vec<&Fence>) -> Vec<&str> {
    fences.into_iter().map(|f| &*f.id).collect()
}

#[test]
fn lookup_respects_holes_and_multipolygons() {
    let idx = index();
    assert_eq!(idx.len(), 2);
    assert_eq!(ids(idx.containing(48.095, 11.495)), vec!["yard"]);
    assert!(idx.containing(48.1, 11.5).is_empty(), "inside the hole");
    assert_eq!(ids(idx.containing(48.095, 11.605)), vec!["depots"]);
    assert_eq!(ids(idx.containing(48.095, 11.705)), vec!["depots"]);
    assert!(
        idx.containing(48.095, 11.65).is_empty(),
        "between the depots"
    );
    assert!(idx.containing(0.0, 0.0).is_empty());
}

/// A small deterministic generator (xorshift64*), for the grid tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn feature(id: &str, rings: &[Vec<(f64, f64)>]) -> String {
    let rings: Vec<String> = rings
        .iter()
        .map(|r| {
            let pts: Vec<String> = r.iter().map(|(x, y)| format!("[{x},{y}]")).collect();
            format!("[{}]", pts.join(","))
        })
        .collect();
    format!(
        r#"{{"type":"Feature","properties":{{"id":"{id}"}},"geometry":{{"type":"Polygon","coordinates":[{}]}}}}"#,
        rings.join(",")
    )
}

/// The fences of a FeatureCollection of `features`.
fn collection(features: &[String]) -> Vec<Fence> {
    let doc = format!(
        r#"{{"type":"FeatureCollection","features":[{}]}}"#,
        features.join(",")
    );
    fences_from_value(&serde_json::from_str(&doc).unwrap()).unwrap()
}

fn closed(mut ring: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    ring.push(ring[0]);
    ring
}

/// Squares scattered as edge-sim draws them, overlapping each other; an
/// L-shaped fence; a circle of more vertices than cells are classified
/// for; and the square with a hole and the two-part fence above.
fn grid_test_fences() -> Vec<Fence> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut features = Vec::new();
    for i in 0..60 {
        let (x, y) = (rng.range(11.0, 12.0), rng.range(48.0, 48.6));
        let h = rng.range(0.01, 0.08);
        features.push(feature(
            &format!("sq{i:02}"),
            &[closed(vec![
                (x - h, y - h),
                (x + h, y - h),
                (x + h, y + h),
                (x - h, y + h),
            ])],
        ));
    }
    features.push(feature(
        "ell",
        &[closed(vec![
            (11.2, 48.2),
            (11.5, 48.2),
            (11.5, 48.25),
            (11.25, 48.25),
            (11.25, 48.5),
            (11.2, 48.5),
        ])],
    ));
    let circle: Vec<(f64, f64)> = (0..600)
        .map(|k| {
            let a = k as f64 * std::f64::consts::TAU / 600.0;
            (11.6 + 0.2 * a.cos(), 48.3 + 0.15 * a.sin())
        })
        .collect();
    features.push(feature("round", &[closed(circle)]));
    let mut fences = collection(&features);
    fences.extend(parse_fences(FENCES).unwrap());
    fences
}

/// The grid answers exactly as the R-tree with a point-in-polygon test
/// does: at random points, at every vertex, on every edge, and on the
/// grid's own cell lines.
#[test]
fn the_grid_answers_as_the_tree_does() {
    let mut idx = FenceIndex::new(grid_test_fences());
    let grid = idx.grid.as_ref().expect("fences make a grid");
    assert!(grid.cols * grid.rows > 100, "{} x {}", grid.cols, grid.rows);
    let whole = grid.entries.iter().filter(|e| e.1 == Cover::Whole).count();
    assert!(whole > 0, "some cells are wholly inside a fence");
    grid_matches_tree(&idx, 200_000);
    // Out of budget part way: the rest of the cells test the point.
    idx.grid = Grid::build_within(&idx.fences, &idx.tree, 3_000, GRID_MAX_ENTRIES);
    let grid = idx.grid.as_ref().unwrap();
    let partial = grid
        .entries
        .iter()
        .filter(|e| e.1 == Cover::Partial)
        .count();
    assert!(
        partial * 2 > grid.entries.len(),
        "{partial} of {}",
        grid.entries.len()
    );
    grid_matches_tree(&idx, 20_000);
    // Too many entries at first: a coarser grid.
    let fine = FenceIndex::new(grid_test_fences());
    let fine = fine.grid.as_ref().unwrap();
    let limit = fine.entries.len() / 2;
    idx.grid = Grid::build_within(&idx.fences, &idx.tree, GRID_CLASSIFY_MAX_EDGES, limit);
    let grid = idx.grid.as_ref().unwrap();
    assert!(grid.entries.len() <= limit);
    assert!(grid.cols * grid.rows < fine.cols * fine.rows);
    grid_matches_tree(&idx, 20_000);
}

/// Checks `points` random points, and every vertex, edge and cell line.
fn grid_matches_tree(idx: &FenceIndex, points: usize) {
    let grid = idx.grid.as_ref().unwrap();
    let check = |lon: f64, lat: f64| {
        let by_grid: Vec<&str> = idx.containing(lat, lon).iter().map(|f| &*f.id).collect();
        let by_tree: Vec<&str> = idx
            .containing_by_tree(Point::new(lon, lat))
            .iter()
            .map(|f| &*f.id)
            .collect();
        assert_eq!(by_grid, by_tree, "at lon {lon}, lat {lat}");
        !by_tree.is_empty()
    };
    let mut rng = Rng(7);
    let mut inside = 0;
    for _ in 0..points {
        inside += usize::from(check(rng.range(10.8, 12.2), rng.range(47.9, 48.7)));
    }
    assert!(inside > points / 20, "{inside} points inside a fence");
    for fence in &idx.fences {
        use geo::LinesIter;
        for line in fence.area.lines_iter() {
            check(line.start.x, line.start.y);
            for t in [0.5, 0.25, 1e-9] {
                check(
                    line.start.x + (line.end.x - line.start.x) * t,
                    line.start.y + (line.end.y - line.start.y) * t,
                );
            }
        }
    }
    for col in 0..=grid.cols {
        let x = grid.min_x + col as f64 / grid.scale_x;
        for _ in 0..50 {
            check(x, rng.range(47.9, 48.7));
        }
    }
    for row in 0..=grid.rows {
        let y = grid.min_y + row as f64 / grid.scale_y;
        for _ in 0..50 {
            check(rng.range(10.8, 12.2), y);
        }
    }
    for (lon, lat) in [
        (f64::NAN, 48.0),
        (11.5, f64::NAN),
        (-180.0, -90.0),
        (180.0, 90.0),
    ] {
        check(lon, lat);
    }
}

#[test]
fn cells_that_meet_many_fences_ask_the_tree() {
    // Fences that all cover the whole extent: every cell meets all 300.
    let features: Vec<String> = (0..300)
        .map(|i| {
            let d = i as f64 * 1e-4;
            feature(
                &format!("big{i:03}"),
                &[closed(vec![
                    (10.0 - d, 40.0 - d),
                    (12.0 + d, 40.0 - d),
                    (12.0 + d, 50.0 + d),
                    (10.0 - d, 50.0 + d),
                ])],
            )
        })
        .collect();
    let fences = collection(&features);
    let idx = FenceIndex::new(fences);
    let grid = idx.grid.as_ref().unwrap();
    assert!(grid.dense.iter().all(|&d| d));
    assert!(grid.entries.is_empty());
    assert_eq!(idx.containing(45.0, 11.0).len(), 300);
    // Below the southern edge of the first fence: all but that one.
    assert_eq!(idx.containing(40.0 - 0.5e-4, 11.0).len(), 299);
    grid_matches_tree(&idx, 20_000);
}

fn replace_geometry(geometry: &str) -> String {
    format!(
        r#"{{"type":"FeatureCollection","features":[{{"type":"Feature","properties":{{"id":"f"}},"geometry":{geometry}}}]}}"#
    )
}

#[test]
fn invalid_polygons_refuse_the_whole_file() {
    let bowtie =
        replace_geometry(r#"{"type":"Polygon","coordinates":[[[0,0],[1,1],[1,0],[0,1],[0,0]]]}"#);
    let err = parse_fences(&bowtie).unwrap_err().to_string();
    assert!(err.contains("not a valid polygon"), "{err}");

    let unclosed =
        replace_geometry(r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1]]]}"#);
    assert!(
        parse_fences(&unclosed)
            .unwrap_err()
            .to_string()
            .contains("closed")
    );

    let mut ring: Vec<String> = (0..MAX_FENCE_VERTICES + 1)
        .map(|i| {
            let a = i as f64 / (MAX_FENCE_VERTICES + 1) as f64 * std::f64::consts::TAU;
            format!("[{},{}]", a.cos(), a.sin())
        })
        .collect();
    ring.push(ring[0].clone());
    let huge = replace_geometry(&format!(
        r#"{{"type":"Polygon","coordinates":[[{}]]}}"#,
        ring.join(",")
    ));
    assert!(
        parse_fences(&huge)
            .unwrap_err()
            .to_string()
            .contains("vertices")
    );

    let out_of_range =
        replace_geometry(r#"{"type":"Polygon","coordinates":[[[0,0],[200,0],[1,1],[0,0]]]}"#);
    assert!(
        parse_fences(&out_of_range)
            .unwrap_err()
            .to_string()
            .contains("outside")
    );

    let point = replace_geometry(r#"{"type":"Point","coordinates":[0,0]}"#);
    assert!(
        parse_fences(&point)
            .unwrap_err()
            .to_string()
            .contains("Polygon or MultiPolygon")
    );

    assert!(matches!(
        parse_fences("{not json"),
        Err(FenceError::Json(_))
    ));
    assert_eq!(
        parse_fences(r#"{"type":"Feature"}"#).unwrap_err(),
        FenceError::NotAFeatureCollection
    );
}

#[test]
fn ids_are_checked_and_unique() {
    let twice = FENCES.replace("\"depots\"", "\"yard\"");
    assert!(
        parse_fences(&twice)
            .unwrap_err()
            .to_string()
            .contains("duplicate fence id")
    );
    let bad = FENCES.replace("\"depots\"", "\"a/b\"");
    assert!(
        parse_fences(&bad)
            .unwrap_err()
            .to_string()
            .contains("properties.id")
    );
}

#[test]
fn enter_dwell_exit_absent() {
    let idx = index();
    let mut state = DeviceFences::default();
    let step = |state: &mut DeviceFences, seq: u64, ts_s: i64, lat: f64, lon: f64| {
        state
            .step(&idx, "truck-1", seq, ts_s * 1000, lat, lon)
            .into_iter()
            .map(|e| (e.kind, e.fence_id))
            .collect::<Vec<_>>()
    };
    assert_eq!(step(&mut state, 1, 0, 48.0, 11.0), vec![]);
    assert_eq!(
        step(&mut state, 2, 10, 48.095, 11.495),
        vec![(FenceEventKind::Enter, "yard".into())]
    );
    assert_eq!(step(&mut state, 3, 40, 48.095, 11.496), vec![]);
    assert_eq!(
        step(&mut state, 4, 70, 48.095, 11.497),
        vec![(FenceEventKind::Dwell, "yard".into())]
    );
    assert_eq!(
        step(&mut state, 5, 80, 48.095, 11.497),
        vec![],
        "dwell is reported once"
    );
    assert_eq!(
        step(&mut state, 6, 90, 48.0, 11.0),
        vec![(FenceEventKind::Exit, "yard".into())]
    );
    assert_eq!(step(&mut state, 7, 150, 48.0, 11.0), vec![]);
    assert_eq!(
        step(&mut state, 8, 210, 48.0, 11.0),
        vec![(FenceEventKind::Absent, "yard".into())]
    );
    assert_eq!(
        step(&mut state, 9, 400, 48.0, 11.0),
        vec![],
        "absent is reported once"
    );
    // Back inside before the absent time: no absent.
    assert_eq!(
        step(&mut state, 10, 410, 48.095, 11.495),
        vec![(FenceEventKind::Enter, "yard".into())]
    );
    assert_eq!(
        step(&mut state, 11, 420, 48.0, 11.0),
        vec![(FenceEventKind::Exit, "yard".into())]
    );
    assert_eq!(
        step(&mut state, 12, 430, 48.095, 11.495),
        vec![(FenceEventKind::Enter, "yard".into())]
    );
    assert_eq!(
        step(&mut state, 13, 600, 48.095, 11.495),
        vec![(FenceEventKind::Dwell, "yard".into())]
    );
}

#[test]
fn persisted_state_gives_no_spurious_enter_after_a_restart() {
    let idx = index();
    let mut state = DeviceFences::default();
    let events = state.step(&idx, "truck-2", 1, 1_000, 48.095, 11.605);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, "truck-2:1:depots:enter");
    let saved = serde_json::to_string(&state).unwrap();
    let mut restored: DeviceFences = serde_json::from_str(&saved).unwrap();
    assert_eq!(restored, state);
    assert!(
        restored
            .step(&idx, "truck-2", 2, 2_000, 48.095, 11.606)
            .is_empty()
    );
}

#[test]
fn event_ids_are_deterministic() {
    let idx = index();
    let run = || {
        let mut s = DeviceFences::default();
        s.step(&idx, "d", 7, 0, 48.095, 11.495)
    };
    assert_eq!(run(), run());
}

#[test]
fn fences_removed_from_the_registry_leave_no_state() {
    let mut state = DeviceFences::default();
    state.step(&index(), "d", 1, 0, 48.095, 11.495);
    assert!(state.is_inside("yard"));
    let without_yard = FenceIndex::new(
        parse_fences(FENCES)
            .unwrap()
            .into_iter()
            .filter(|f| &*f.id != "yard")
            .collect(),
    );
    let events = state.step(&without_yard, "d", 2, 1_000, 48.095, 11.495);
    assert_eq!(
        events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![FenceEventKind::Exit]
    );
    assert!(state.inside.is_empty() && state.left.is_empty());
}

#[test]
fn absent_timers_end_with_the_fence_or_its_absent_setting() {
    let text = r#"{"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"id": "a", "absent_seconds": 10},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}},
        {"type": "Feature", "properties": {"id": "b", "absent_seconds": 10},
         "geometry": {"type": "Polygon", "coordinates": [[[2, 0], [3, 0], [3, 1], [2, 1], [2, 0]]]}}]}"#;
    let index = FenceIndex::new(parse_fences(text).unwrap());
    let mut state = DeviceFences::default();
    state.step(&index, "d", 1, 0, 0.5, 0.5);
    state.step(&index, "d", 2, 1_000, 0.5, 2.5);
    state.step(&index, "d", 3, 2_000, 5.0, 5.0);
    assert_eq!(state.left.len(), 2);
    // "a" loses its absent setting, "b" stays as it was.
    let changed =
        FenceIndex::new(parse_fences(&text.replacen(", \"absent_seconds\": 10", "", 1)).unwrap());
    assert!(state.forget_unknown(&changed));
    assert_eq!(
        state
            .left
            .iter()
            .map(|l| l.fence.name().to_string())
            .collect::<Vec<_>>(),
        ["b"]
    );
    let events = state.step(&changed, "d", 4, 60_000, 5.0, 5.0);
    assert_eq!(
        events
            .iter()
            .map(|e| (e.kind, e.fence_id.as_str()))
            .collect::<Vec<_>>(),
        [(FenceEventKind::Absent, "b")]
    );
}

#[test]
fn fence_ids_order_by_name_and_survive_a_round_trip_to_disk() {
    // Interned in the opposite order of their names.
    let z = FenceId::of("order-test-z");
    let a = FenceId::of("order-test-a");
    assert!(a < z);
    assert_eq!(FenceId::of("order-test-z"), z);
    assert_eq!(&*z.name(), "order-test-z");
    let state = DeviceFences {
        inside: vec![Inside {
            fence: z,
            since: 5,
            dwell_reported: true,
        }],
        left: vec![Left { fence: a, due: 9 }],
        ..Default::default()
    };
    let bytes = postcard::to_allocvec(&state).unwrap();
    // Stored as names, so another process reads the same fences.
    assert!(bytes.windows(12).any(|w| w == b"order-test-z"));
    let back: DeviceFences = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, state);
    assert_eq!(std::mem::size_of::<Left>(), 16);
    assert_eq!(std::mem::size_of::<Inside>(), 16);
}

#[test]
fn event_ids_spell_device_seq_fence_and_kind() {
    for seq in [0, 7, 10, 1_234_567_890, u64::MAX] {
        for kind in [
            FenceEventKind::Enter,
            FenceEventKind::Exit,
            FenceEventKind::Dwell,
            FenceEventKind::Absent,
        ] {
            assert_eq!(
                event_id("dev-1", seq, "depot:north", kind),
                format!("dev-1:{seq}:depot:north:{}", kind.as_str())
            );
        }
    }
}

/// Not a test: timings of the grid against the R-tree alone on synthetic
/// registries, for the README (`cargo test --release -p edge-agent --lib
/// grid_and_tree_timings -- --ignored --nocapture`). It checks only that
/// both give the same answers.
#[test]
#[ignore]
fn grid_and_tree_timings() {
    for (fences, vertices, lookups) in [
        (200, 4, 100_000),
        (10_000, 4, 10_000),
        (2_000, 400, 10_000),
        (300, 9_000, 100_000),
        (100_000, 4, 0),
    ] {
        let mut rng = Rng(3);
        let features: Vec<String> = (0..fences)
            .map(|i| {
                let (x, y) = (rng.range(-10.0, 10.0), rng.range(40.0, 50.0));
                let r = rng.range(0.01, 3.0);
                let ring = (0..vertices)
                    .map(|k| {
                        let a = k as f64 * std::f64::consts::TAU / vertices as f64;
                        (x + r * a.cos(), y + r * a.sin())
                    })
                    .collect();
                feature(&format!("f{i}"), &[closed(ring)])
            })
            .collect();
        let parsed = collection(&features);
        let started = std::time::Instant::now();
        let idx = FenceIndex::new(parsed);
        let built = started.elapsed();
        let points: Vec<(f64, f64)> = {
            let mut q = Rng(5);
            (0..lookups)
                .map(|_| (q.range(40.0, 50.0), q.range(-10.0, 10.0)))
                .collect()
        };
        let started = std::time::Instant::now();
        let by_grid: usize = points
            .iter()
            .map(|&(lat, lon)| idx.containing(lat, lon).len())
            .sum();
        let grid_time = started.elapsed();
        let started = std::time::Instant::now();
        let by_tree: usize = points
            .iter()
            .map(|&(lat, lon)| idx.containing_by_tree(Point::new(lon, lat)).len())
            .sum();
        let tree_time = started.elapsed();
        assert_eq!(by_grid, by_tree);
        eprintln!(
            "{fences} fences of {vertices} vertices: grid built in {built:?}; {lookups} lookups: grid {grid_time:?}, R-tree {tree_time:?}"
        );
    }
}

#[test]
fn absent_timers_fire_in_turn_and_after_a_round_trip_to_disk() {
    // Three fences left at different times: each `absent` fires at its own
    // due time, whether the state stayed in memory or was stored and read
    // back between readings (which forgets when the next one is due).
    let text = r#"{"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"id": "a", "absent_seconds": 100},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}},
        {"type": "Feature", "properties": {"id": "b", "absent_seconds": 10},
         "geometry": {"type": "Polygon", "coordinates": [[[2, 0], [3, 0], [3, 1], [2, 1], [2, 0]]]}},
        {"type": "Feature", "properties": {"id": "c", "absent_seconds": 50},
         "geometry": {"type": "Polygon", "coordinates": [[[4, 0], [5, 0], [5, 1], [4, 1], [4, 0]]]}}]}"#;
    let index = FenceIndex::new(parse_fences(text).unwrap());
    for stored in [false, true] {
        let mut state = DeviceFences::default();
        let mut seq = 0;
        let mut step = |state: &mut DeviceFences, s: i64, lon: f64| {
            if stored {
                let bytes = postcard::to_allocvec(&*state).unwrap();
                *state = postcard::from_bytes(&bytes).unwrap();
            }
            seq += 1;
            state
                .step(&index, "d", seq, s * 1000, 0.5, lon)
                .into_iter()
                .map(|e| (e.kind, e.fence_id))
                .collect::<Vec<_>>()
        };
        // In and out of a (due 101), b (due 13), c (due 55).
        step(&mut state, 0, 0.5);
        step(&mut state, 1, 9.0);
        step(&mut state, 2, 2.5);
        step(&mut state, 3, 9.0);
        step(&mut state, 4, 4.5);
        step(&mut state, 5, 9.0);
        assert_eq!(state.left.len(), 3, "stored: {stored}");
        let absent = |f: &str| vec![(FenceEventKind::Absent, f.to_string())];
        assert_eq!(step(&mut state, 12, 9.0), vec![]);
        assert_eq!(step(&mut state, 13, 9.0), absent("b"), "stored: {stored}");
        assert_eq!(step(&mut state, 54, 9.0), vec![]);
        // Back into a at c's due time: a's timer ends, c's fires; out of a
        // again, a new timer for it.
        assert_eq!(
            step(&mut state, 60, 0.5),
            vec![
                (FenceEventKind::Enter, "a".to_string()),
                (FenceEventKind::Absent, "c".to_string())
            ],
            "stored: {stored}"
        );
        assert_eq!(
            step(&mut state, 61, 9.0),
            vec![(FenceEventKind::Exit, "a".to_string())]
        );
        assert_eq!(step(&mut state, 160, 9.0), vec![]);
        assert_eq!(step(&mut state, 161, 9.0), absent("a"), "stored: {stored}");
        assert!(state.left.is_empty());
        assert_eq!(step(&mut state, 1000, 9.0), vec![]);
    }
}
