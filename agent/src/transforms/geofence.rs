//! Geofences: polygons from GeoJSON, an R-tree prefilter over their
//! bounding boxes with a grid built from it (most lookups need no
//! point-in-polygon test), and the per-device state machine that turns
//! positions into `enter`, `exit`, `dwell` and `absent` events.
//!
//! The engine is pure: it takes readings (event time = the reading's `ts`)
//! and returns events; the caller persists [`DeviceFences`] with the outbox
//! batch so a restart never produces a spurious `enter`.

use std::sync::Arc;

use geo::{Contains, Coord, LineString, MultiPolygon, Point, Polygon, Validation};
use rstar::{AABB, Envelope, RTree, RTreeObject};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::is_valid_id;

/// Most vertices of one fence (all rings): bounds the cost of a lookup.
pub const MAX_FENCE_VERTICES: usize = 10_000;
/// Most fences in one file.
pub const MAX_FENCES: usize = 100_000;

/// Why a fence file was refused. The whole file is refused: a registry is
/// never half-applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    #[error("fence file is not valid JSON: {0}")]
    Json(String),
    #[error("fence file must be a GeoJSON FeatureCollection")]
    NotAFeatureCollection,
    #[error("feature {index}: {what}")]
    Feature { index: usize, what: String },
    #[error("more than {MAX_FENCES} fences")]
    TooMany,
}

/// One geofence.
#[derive(Debug, Clone)]
pub struct Fence {
    pub id: Arc<str>,
    /// The id as device states hold it.
    pub key: FenceId,
    pub area: MultiPolygon<f64>,
    /// Emit `dwell` once a device stayed inside this long.
    pub dwell_ms: Option<i64>,
    /// Emit `absent` once a device left and did not come back this long.
    pub absent_ms: Option<i64>,
}

fn feature_err(index: usize, what: impl Into<String>) -> FenceError {
    FenceError::Feature {
        index,
        what: what.into(),
    }
}

fn ring(index: usize, value: &Value, vertices: &mut usize) -> Result<LineString<f64>, FenceError> {
    let points = value
        .as_array()
        .ok_or_else(|| feature_err(index, "a ring must be an array of positions"))?;
    if points.len() < 4 {
        return Err(feature_err(
            index,
            format!("a ring needs at least 4 positions, got {}", points.len()),
        ));
    }
    *vertices += points.len();
    if *vertices > MAX_FENCE_VERTICES {
        return Err(feature_err(
            index,
            format!("more than {MAX_FENCE_VERTICES} vertices"),
        ));
    }
    let mut coords = Vec::with_capacity(points.len());
    for p in points {
        let pair = p
            .as_array()
            .filter(|a| a.len() >= 2)
            .ok_or_else(|| feature_err(index, "a position must be [lon, lat]"))?;
        let (Some(lon), Some(lat)) = (pair[0].as_f64(), pair[1].as_f64()) else {
            return Err(feature_err(index, "positions must be numbers"));
        };
        if !(-180.0..=180.0).contains(&lon) || !(-90.0..=90.0).contains(&lat) {
            return Err(feature_err(
                index,
                format!("position [{lon}, {lat}] is outside [-180..180, -90..90]"),
            ));
        }
        coords.push(Coord { x: lon, y: lat });
    }
    if coords.first() != coords.last() {
        return Err(feature_err(
            index,
            "a ring must be closed (first position = last position)",
        ));
    }
    Ok(LineString::new(coords))
}

fn polygon(index: usize, rings: &Value, vertices: &mut usize) -> Result<Polygon<f64>, FenceError> {
    let rings = rings
        .as_array()
        .filter(|r| !r.is_empty())
        .ok_or_else(|| feature_err(index, "a polygon needs at least one ring"))?;
    let exterior = ring(index, &rings[0], vertices)?;
    let holes = rings[1..]
        .iter()
        .map(|r| ring(index, r, vertices))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Polygon::new(exterior, holes))
}

fn optional_seconds(index: usize, props: &Value, key: &str) -> Result<Option<i64>, FenceError> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(s) if s > 0 && s <= 365 * 24 * 3600 => Ok(Some(s as i64 * 1000)),
            _ => Err(feature_err(
                index,
                format!("properties.{key} must be seconds, 1 to 31536000"),
            )),
        },
    }
}

/// Parses and validates a GeoJSON FeatureCollection of fences. Each
/// feature needs `properties.id` and a `Polygon` or `MultiPolygon`
/// geometry (holes allowed); optional `properties.dwell_seconds` and
/// `properties.absent_seconds`. Self-intersecting, unclosed or oversized
/// polygons and duplicate ids refuse the whole file.
pub fn parse_fences(text: &str) -> Result<Vec<Fence>, FenceError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| FenceError::Json(e.to_string()))?;
    fences_from_value(&doc)
}

/// [`parse_fences`] on an already parsed JSON value.
pub fn fences_from_value(doc: &Value) -> Result<Vec<Fence>, FenceError> {
    if doc.get("type").and_then(Value::as_str) != Some("FeatureCollection") {
        return Err(FenceError::NotAFeatureCollection);
    }
    let features = doc
        .get("features")
        .and_then(Value::as_array)
        .ok_or(FenceError::NotAFeatureCollection)?;
    if features.len() > MAX_FENCES {
        return Err(FenceError::TooMany);
    }
    let mut fences = Vec::with_capacity(features.len());
    let mut ids = std::collections::BTreeSet::new();
    for (index, f) in features.iter().enumerate() {
        let props = f.get("properties").unwrap_or(&Value::Null);
        let id = props
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_valid_id(id))
            .ok_or_else(|| {
                feature_err(
                    index,
                    "properties.id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                )
            })?;
        if !ids.insert(id.to_string()) {
            return Err(feature_err(index, format!("duplicate fence id {id:?}")));
        }
        let geometry = f
            .get("geometry")
            .ok_or_else(|| feature_err(index, "missing geometry"))?;
        let coordinates = geometry
            .get("coordinates")
            .ok_or_else(|| feature_err(index, "geometry without coordinates"))?;
        let mut vertices = 0;
        let area = match geometry.get("type").and_then(Value::as_str) {
            Some("Polygon") => MultiPolygon::new(vec![polygon(index, coordinates, &mut vertices)?]),
            Some("MultiPolygon") => {
                let parts = coordinates
                    .as_array()
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| {
                        feature_err(index, "a MultiPolygon needs at least one polygon")
                    })?;
                MultiPolygon::new(
                    parts
                        .iter()
                        .map(|p| polygon(index, p, &mut vertices))
                        .collect::<Result<_, _>>()?,
                )
            }
            other => {
                return Err(feature_err(
                    index,
                    format!("geometry must be Polygon or MultiPolygon, got {other:?}"),
                ));
            }
        };
        if let Err(e) = area.check_validation() {
            return Err(feature_err(
                index,
                format!("fence {id:?} is not a valid polygon: {e}"),
            ));
        }
        fences.push(Fence {
            key: FenceId::of(id),
            id: Arc::from(id),
            area,
            dwell_ms: optional_seconds(index, props, "dwell_seconds")?,
            absent_ms: optional_seconds(index, props, "absent_seconds")?,
        });
    }
    Ok(fences)
}

struct Indexed {
    envelope: AABB<[f64; 2]>,
    fence: usize,
}

impl RTreeObject for Indexed {
    type Envelope = AABB<[f64; 2]>;
    fn envelope(&self) -> Self::Envelope {
        self.envelope
    }
}

/// Fences with an R-tree over their bounding boxes, and a grid built from
/// it that answers most lookups without a point-in-polygon test.
pub struct FenceIndex {
    fences: Vec<Fence>,
    by_key: foldhash::HashMap<FenceId, usize>,
    tree: RTree<Indexed>,
    grid: Option<Grid>,
    /// Each fence's bounding box, by index: a cell's fence whose boundary
    /// crosses the cell is tested only if its box holds the point.
    boxes: Vec<Option<AABB<[f64; 2]>>>,
}

/// Cells of the grid per fence, and at most in all.
const GRID_CELLS_PER_FENCE: usize = 16;
const GRID_MAX_CELLS: usize = 1 << 16;
/// Most (cell, fence) entries: past it the grid gets coarser.
const GRID_MAX_ENTRIES: usize = 1 << 20;
/// A cell whose area meets more fences' bounding boxes than this lists
/// none: lookups there ask the R-tree, which narrows them to the boxes
/// holding the point itself.
const GRID_MAX_PER_CELL: usize = 32;
/// Fences with more vertices are not classified per cell (that costs a
/// pass over their edges per cell): their cells always test the point.
const GRID_CLASSIFY_MAX_VERTICES: usize = 512;
/// Edges tested against cells while a grid is built, at most (about a
/// tenth of a second): past it, cells test the point (still correct), so
/// no registry, however large, stalls the swap that builds the index.
const GRID_CLASSIFY_MAX_EDGES: usize = 20_000_000;

/// How a grid cell lies against one fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// The cell is inside the fence, clear of its boundary: every point in
    /// it is inside.
    Whole,
    /// The fence's boundary may cross the cell: test the point.
    Partial,
}

/// A uniform grid over the fences' bounding boxes. Each cell lists, by
/// fence id, the fences that meet it (found with the R-tree) and whether
/// it lies wholly inside each. Fences that do not meet a cell, although
/// their bounding box does, are left out of it. Cells are classified as
/// slightly larger rectangles than they are (by [`Grid::margin`]), so a
/// point that rounding puts in a neighbouring cell is still covered by
/// the classification. A cell that meets too many fences' boxes lists
/// none, and its lookups go to the R-tree.
struct Grid {
    min_x: f64,
    min_y: f64,
    /// Cells per degree.
    scale_x: f64,
    scale_y: f64,
    cols: usize,
    rows: usize,
    /// Cell `i` holds `entries[starts[i]..starts[i + 1]]`.
    starts: Vec<u32>,
    entries: Vec<(u32, Cover)>,
    /// Cells that meet too many fences to list them (see
    /// [`GRID_MAX_PER_CELL`]).
    dense: Vec<bool>,
}

/// Where a lookup finds its candidates.
enum Candidates<'a> {
    /// The cell's list (empty outside the grid).
    Cell(&'a [(u32, Cover)]),
    /// A dense cell: the R-tree.
    Tree,
}

impl Grid {
    /// `None` when there is nothing to grid.
    fn build(fences: &[Fence], tree: &RTree<Indexed>) -> Option<Self> {
        Self::build_within(fences, tree, GRID_CLASSIFY_MAX_EDGES, GRID_MAX_ENTRIES)
    }

    /// [`Self::build`] with `budget` edges to classify cells with and at
    /// most `max_entries` entries.
    fn build_within(
        fences: &[Fence],
        tree: &RTree<Indexed>,
        mut budget: usize,
        max_entries: usize,
    ) -> Option<Self> {
        let bounds = fences
            .iter()
            .filter_map(|f| geo::BoundingRect::bounding_rect(&f.area))
            .reduce(|a, b| {
                geo::Rect::new(
                    Coord {
                        x: a.min().x.min(b.min().x),
                        y: a.min().y.min(b.min().y),
                    },
                    Coord {
                        x: a.max().x.max(b.max().x),
                        y: a.max().y.max(b.max().y),
                    },
                )
            })?;
        let (width, height) = (bounds.width(), bounds.height());
        // Square cells where the extent allows it.
        let cells = (fences.len() * GRID_CELLS_PER_FENCE).clamp(1, GRID_MAX_CELLS) as f64;
        let side = ((width * height) / cells).sqrt();
        let (mut cols, mut rows) = if side > 0.0 {
            (
                ((width / side).ceil() as usize).clamp(1, GRID_MAX_CELLS),
                ((height / side).ceil() as usize).clamp(1, GRID_MAX_CELLS),
            )
        } else {
            (1, 1)
        };
        while cols * rows > GRID_MAX_CELLS {
            cols = cols.div_ceil(2);
            rows = rows.div_ceil(2);
        }
        loop {
            if let Some(grid) =
                Self::fill(fences, tree, bounds, cols, rows, &mut budget, max_entries)
            {
                return Some(grid);
            }
            if cols == 1 && rows == 1 {
                // Even one cell holds every fence at most once.
                return None;
            }
            cols = cols.div_ceil(2);
            rows = rows.div_ceil(2);
        }
    }

    /// The grid at this resolution, or `None` past `max_entries`.
    fn fill(
        fences: &[Fence],
        tree: &RTree<Indexed>,
        bounds: geo::Rect<f64>,
        cols: usize,
        rows: usize,
        budget: &mut usize,
        max_entries: usize,
    ) -> Option<Self> {
        let cell_w = bounds.width() / cols as f64;
        let cell_h = bounds.height() / rows as f64;
        let mut grid = Grid {
            min_x: bounds.min().x,
            min_y: bounds.min().y,
            scale_x: if cell_w > 0.0 { 1.0 / cell_w } else { 0.0 },
            scale_y: if cell_h > 0.0 { 1.0 / cell_h } else { 0.0 },
            cols,
            rows,
            starts: Vec::with_capacity(cols * rows + 1),
            entries: Vec::new(),
            dense: Vec::with_capacity(cols * rows),
        };
        let margin = Self::margin(cell_w.max(cell_h));
        let mut found: Vec<usize> = Vec::new();
        for row in 0..rows {
            for col in 0..cols {
                grid.starts.push(u32::try_from(grid.entries.len()).ok()?);
                let x0 = grid.min_x + col as f64 * cell_w - margin;
                let y0 = grid.min_y + row as f64 * cell_h - margin;
                let x1 = grid.min_x + (col + 1) as f64 * cell_w + margin;
                let y1 = grid.min_y + (row + 1) as f64 * cell_h + margin;
                found.clear();
                found.extend(
                    tree.locate_in_envelope_intersecting(&AABB::from_corners([x0, y0], [x1, y1]))
                        .map(|i| i.fence),
                );
                let dense = found.len() > GRID_MAX_PER_CELL;
                grid.dense.push(dense);
                if dense {
                    continue;
                }
                found.sort_unstable_by(|&a, &b| fences[a].id.cmp(&fences[b].id));
                let rect = geo::Rect::new(Coord { x: x0, y: y0 }, Coord { x: x1, y: y1 });
                for &i in &found {
                    if let Some(cover) = classify(&fences[i].area, &rect, budget) {
                        grid.entries.push((i as u32, cover));
                    }
                }
                if grid.entries.len() > max_entries {
                    return None;
                }
            }
        }
        grid.starts.push(u32::try_from(grid.entries.len()).ok()?);
        Some(grid)
    }

    /// How much larger than a cell its classified rectangle is: far more
    /// than the rounding of a point's cell, far less than a cell.
    fn margin(cell: f64) -> f64 {
        cell * 1e-6 + 1e-9
    }

    /// The candidates for a point.
    fn candidates(&self, x: f64, y: f64) -> Candidates<'_> {
        let col = (x - self.min_x) * self.scale_x;
        let row = (y - self.min_y) * self.scale_y;
        // Also false for NaN. A point on the far edge of the bounds (or a
        // rounding past it) belongs to the last cell.
        if !(col >= 0.0 && row >= 0.0 && col <= self.cols as f64 && row <= self.rows as f64) {
            return Candidates::Cell(&[]);
        }
        let col = (col as usize).min(self.cols - 1);
        let row = (row as usize).min(self.rows - 1);
        let i = row * self.cols + col;
        if self.dense[i] {
            return Candidates::Tree;
        }
        Candidates::Cell(&self.entries[self.starts[i] as usize..self.starts[i + 1] as usize])
    }
}

/// How `rect` lies against `area`; `None` when it is wholly outside.
/// Classifying costs a pass over the fence's edges, taken from `budget`;
/// a fence too large for it, or for what is left of it, is `Partial`.
fn classify(area: &MultiPolygon<f64>, rect: &geo::Rect<f64>, budget: &mut usize) -> Option<Cover> {
    use geo::{CoordsIter, Intersects, LinesIter};
    let edges = area.coords_count();
    if edges > GRID_CLASSIFY_MAX_VERTICES || edges > *budget {
        return Some(Cover::Partial);
    }
    *budget -= edges;
    if area.lines_iter().any(|line| line.intersects(rect)) {
        return Some(Cover::Partial);
    }
    // No edge meets the rectangle, so it lies in one region of the plane
    // the rings cut: all inside the area or all outside it.
    area.contains(&Point::from(rect.min()))
        .then_some(Cover::Whole)
}

impl FenceIndex {
    pub fn new(fences: Vec<Fence>) -> Self {
        let boxes: Vec<Option<AABB<[f64; 2]>>> = fences
            .iter()
            .map(|f| {
                let rect = geo::BoundingRect::bounding_rect(&f.area)?;
                Some(AABB::from_corners(
                    [rect.min().x, rect.min().y],
                    [rect.max().x, rect.max().y],
                ))
            })
            .collect();
        let items = boxes
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                Some(Indexed {
                    envelope: (*b)?,
                    fence: i,
                })
            })
            .collect();
        let by_key = fences.iter().enumerate().map(|(i, f)| (f.key, i)).collect();
        let tree = RTree::bulk_load(items);
        let grid = Grid::build(&fences, &tree);
        Self {
            fences,
            by_key,
            tree,
            grid,
            boxes,
        }
    }

    pub fn len(&self) -> usize {
        self.fences.len()
    }

    pub fn fences(&self) -> &[Fence] {
        &self.fences
    }

    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    /// Fences containing the position (boundary excluded), sorted by id.
    pub fn containing(&self, lat: f64, lon: f64) -> Vec<&Fence> {
        let point = Point::new(lon, lat);
        let cell = match self.grid.as_ref().map(|g| g.candidates(lon, lat)) {
            Some(Candidates::Cell(cell)) => cell,
            Some(Candidates::Tree) | None => return self.containing_by_tree(point),
        };
        cell.iter()
            .filter(|&&(i, cover)| {
                let i = i as usize;
                cover == Cover::Whole
                    || (self.boxes[i].is_some_and(|b| b.contains_point(&[lon, lat]))
                        && self.fences[i].area.contains(&point))
            })
            .map(|&(i, _)| &self.fences[i as usize])
            .collect()
    }

    /// [`Self::containing`] with the R-tree alone.
    fn containing_by_tree(&self, point: Point<f64>) -> Vec<&Fence> {
        let (lon, lat) = (point.x(), point.y());
        let mut out: Vec<&Fence> = self
            .tree
            .locate_in_envelope_intersecting(&AABB::from_point([lon, lat]))
            .map(|i| &self.fences[i.fence])
            .filter(|f| f.area.contains(&point))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn get(&self, key: FenceId) -> Option<&Fence> {
        self.by_key.get(&key).map(|&i| &self.fences[i])
    }
}

/// What happened between a device and a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FenceEventKind {
    Enter,
    Exit,
    Dwell,
    Absent,
}

impl FenceEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enter => "enter",
            Self::Exit => "exit",
            Self::Dwell => "dwell",
            Self::Absent => "absent",
        }
    }
}

/// The deterministic id of a fence event: `{device}:{seq}:{fence}:{kind}`,
/// built without the formatting machinery (one per event, on the hot path).
fn event_id(device_id: &str, seq: u64, fence_id: &str, kind: FenceEventKind) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = seq;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let kind = kind.as_str();
    let mut id = String::with_capacity(device_id.len() + fence_id.len() + kind.len() + 23);
    id.push_str(device_id);
    id.push(':');
    // ASCII digits.
    id.extend(digits[at..].iter().map(|&d| char::from(d)));
    id.push(':');
    id.push_str(fence_id);
    id.push(':');
    id.push_str(kind);
    id
}

/// A geofence event, ready to become an alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FenceEvent {
    /// Deterministic: the same reading always gives the same id, so a retry
    /// overwrites the alert instead of duplicating it.
    pub id: String,
    pub kind: FenceEventKind,
    pub device_id: String,
    pub fence_id: String,
    /// The device's key (`seq`) of the reading that raised it.
    pub seq: u64,
    pub ts: i64,
    pub lat: f64,
    pub lon: f64,
}

/// A fence id as device state holds it: 4 bytes, the index of the name in
/// a process-wide table that stores each name once, also for states read
/// back from disk. On disk it is the name itself. Ordered by name.
///
/// The table only grows: by the fence names this process has seen, a few
/// dozen bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FenceId(u32);

#[derive(Default)]
struct FenceNames {
    ids: foldhash::HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

static FENCE_NAMES: std::sync::LazyLock<std::sync::RwLock<FenceNames>> =
    std::sync::LazyLock::new(Default::default);

fn fence_names() -> std::sync::RwLockReadGuard<'static, FenceNames> {
    // The table is consistent after every write: a panic elsewhere cannot
    // leave it half-changed.
    FENCE_NAMES.read().unwrap_or_else(|e| e.into_inner())
}

impl FenceId {
    /// The id of `name`, added to the table when new.
    pub fn of(name: &str) -> Self {
        if let Some(&id) = fence_names().ids.get(name) {
            return Self(id);
        }
        let mut table = FENCE_NAMES.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = table.ids.get(name) {
            return Self(id);
        }
        let id = u32::try_from(table.names.len())
            .expect("fewer than 4 billion distinct fence names in one process");
        let name: Arc<str> = Arc::from(name);
        table.names.push(name.clone());
        table.ids.insert(name, id);
        Self(id)
    }

    pub fn name(self) -> Arc<str> {
        fence_names().names[self.0 as usize].clone()
    }
}

impl Ord for FenceId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if self == other {
            return std::cmp::Ordering::Equal;
        }
        let table = fence_names();
        table.names[self.0 as usize].cmp(&table.names[other.0 as usize])
    }
}

impl PartialOrd for FenceId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for FenceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for FenceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        std::borrow::Cow::<'de, str>::deserialize(d).map(|name| Self::of(&name))
    }
}

/// A fence a device is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inside {
    pub fence: FenceId,
    /// Event time the device entered.
    pub since: i64,
    /// `dwell` already raised for this stay.
    pub dwell_reported: bool,
}

/// A fence a device left, waiting for `absent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub fence: FenceId,
    /// Event time at which `absent` fires unless the device is back.
    pub due: i64,
}

/// Per-device fence state; persisted with the outbox batch. Small vectors
/// rather than maps: a device is in a handful of fences at most, and 10,000
/// devices' states must stay small.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceFences {
    pub inside: Vec<Inside>,
    pub left: Vec<Left>,
    /// No `absent` is due before this event time (at most the earliest
    /// `due` in `left`), so most readings need not read `left`, which
    /// lies elsewhere in memory. Not stored: `None` after loading, and
    /// the next reading looks.
    #[serde(skip)]
    absent_from: Option<i64>,
}

/// The state itself, not the hint of when to look at it.
impl PartialEq for DeviceFences {
    fn eq(&self, other: &Self) -> bool {
        self.inside == other.inside && self.left == other.left
    }
}

impl Eq for DeviceFences {}

impl DeviceFences {
    pub fn is_empty(&self) -> bool {
        self.inside.is_empty() && self.left.is_empty()
    }

    /// Whether the device is inside `fence`.
    pub fn is_inside(&self, fence: &str) -> bool {
        self.inside.iter().any(|i| &*i.fence.name() == fence)
    }

    fn is_inside_key(&self, key: FenceId) -> bool {
        self.inside.iter().any(|i| i.fence == key)
    }

    /// Advances the state with one position; returns the events it raises.
    /// The state changes exactly when an event is raised.
    pub fn step(
        &mut self,
        index: &FenceIndex,
        device_id: &str,
        seq: u64,
        ts: i64,
        lat: f64,
        lon: f64,
    ) -> Vec<FenceEvent> {
        let now_inside = index.containing(lat, lon);
        let mut events = Vec::new();
        if now_inside.is_empty() && self.is_empty() {
            return events;
        }
        let mut emit = |kind: FenceEventKind, fence_id: &str| {
            events.push(FenceEvent {
                id: event_id(device_id, seq, fence_id, kind),
                kind,
                device_id: device_id.to_string(),
                fence_id: fence_id.to_string(),
                seq,
                ts,
                lat,
                lon,
            });
        };
        if self.inside.len() != now_inside.len()
            || !now_inside.iter().all(|f| self.is_inside_key(f.key))
        {
            let mut i = 0;
            while i < self.inside.len() {
                if now_inside.iter().any(|f| f.key == self.inside[i].fence) {
                    i += 1;
                    continue;
                }
                let gone = self.inside.remove(i);
                emit(FenceEventKind::Exit, &gone.fence.name());
                if let Some(absent) = index.get(gone.fence).and_then(|f| f.absent_ms) {
                    let due = ts.saturating_add(absent);
                    self.left.retain(|l| l.fence != gone.fence);
                    self.left.push(Left {
                        fence: gone.fence,
                        due,
                    });
                    self.absent_from = self.absent_from.map(|t| t.min(due));
                }
            }
            for fence in &now_inside {
                if !self.is_inside_key(fence.key) {
                    self.inside.push(Inside {
                        fence: fence.key,
                        since: ts,
                        dwell_reported: false,
                    });
                    self.left.retain(|l| l.fence != fence.key);
                    emit(FenceEventKind::Enter, &fence.id);
                }
            }
            self.inside.sort_by_key(|a| a.fence);
        }
        for inside in self.inside.iter_mut() {
            if !inside.dwell_reported
                && let Some(dwell) = index.get(inside.fence).and_then(|f| f.dwell_ms)
                && ts - inside.since >= dwell
            {
                inside.dwell_reported = true;
                emit(FenceEventKind::Dwell, &inside.fence.name());
            }
        }
        if self.absent_from.is_none_or(|t| ts >= t) {
            if self.left.iter().any(|l| ts >= l.due) {
                let mut absent: Vec<FenceId> = Vec::new();
                self.left.retain(|l| {
                    let due = ts >= l.due;
                    if due {
                        absent.push(l.fence);
                    }
                    !due
                });
                absent.sort();
                for id in absent {
                    emit(FenceEventKind::Absent, &id.name());
                }
            }
            self.absent_from = Some(self.left.iter().map(|l| l.due).min().unwrap_or(i64::MAX));
        }
        events
    }

    /// Drops absent timers of fences no longer in `index`, or no longer
    /// with `absent_seconds` (after a registry change); returns whether
    /// anything was dropped.
    pub fn forget_unknown(&mut self, index: &FenceIndex) -> bool {
        let before = self.left.len();
        self.left
            .retain(|l| index.get(l.fence).is_some_and(|f| f.absent_ms.is_some()));
        // `inside` entries of a removed fence go on the next step, with an
        // `exit` event; only absent timers are dropped here.
        before != self.left.len()
    }
}

#[cfg(test)]
mod tests;
