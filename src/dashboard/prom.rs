//! Reading back the Prometheus text exposition this node renders (the
//! dashboard's sample is made from it, so the page shows exactly what a
//! scraper sees). Only what `metrics-exporter-prometheus` writes is needed:
//! `name{label="value",...} value` lines; comments and lines that do not
//! parse are skipped.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The metric name (with its `_bucket`, `_sum` or `_count` suffix).
    pub name: String,
    /// Its labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Its value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

impl Series {
    /// The value of label `key`, if it has one.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample line of `text`.
pub fn parse(text: &str) -> Vec<Series> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() {
        return None;
    }
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once("=\"")?;
            let (value, r) = unquote(r)?;
            labels.push((key.trim().to_owned(), value));
            rest = r;
        }
    }
    // The value, then an optional timestamp.
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Series {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A label value up to its closing quote (escapes `\\`, `\"`, `\n`), and
/// what follows it.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// A histogram summed over every label but `le`: cumulative counts per
/// finite upper bound, ascending, then the total (the `+Inf` bucket).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Histogram {
    /// Finite upper bounds, ascending.
    pub le: Vec<f64>,
    /// Cumulative count of observations at or under each bound.
    pub counts: Vec<f64>,
    /// Every observation.
    pub count: f64,
    /// The sum of the observations.
    pub sum: f64,
}

/// The samples of one scrape, with the sums the dashboard needs.
#[derive(Debug, Clone, Default)]
pub struct Scrape(Vec<Series>);

impl Scrape {
    /// Parses `text`.
    pub fn new(text: &str) -> Scrape {
        Scrape(parse(text))
    }

    /// The sum of every series of `name` (0 when there is none: a counter
    /// that never moved has not been registered yet; `Sum` would start
    /// from -0.0).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .fold(0.0, |sum, s| sum + s.value)
    }

    /// The sums of `name`'s series by the value of `label`.
    pub fn sum_by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == name) {
            *out.entry(s.label(label).unwrap_or("").to_owned())
                .or_insert(0.0) += s.value;
        }
        out
    }

    /// Histogram `name` (from `name_bucket`, `name_sum`, `name_count`),
    /// summed over its other labels.
    pub fn histogram(&self, name: &str) -> Histogram {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == bucket) {
            let Some(le) = s.label("le").and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            if le.is_finite() {
                // Bounds are positive floats: their bits sort as they do.
                by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
            }
        }
        let (le, counts) = by_le.into_values().unzip();
        Histogram {
            le,
            counts,
            count: self.sum(&format!("{name}_count")),
            sum: self.sum(&format!("{name}_sum")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP berth_ops_total Ops answered
# TYPE berth_ops_total counter
berth_ops_total{op="incr",result="ok"} 10
berth_ops_total{op="get",result="ok"} 5
berth_ops_total{op="incr",result="unavailable"} 2
berth_connections 3
berth_odd{why="a \"quoted\" \\ value, with } and ,"} 1 1700000000000
berth_op_duration_seconds_bucket{op="incr",le="0.001"} 4
berth_op_duration_seconds_bucket{op="incr",le="0.01"} 12
berth_op_duration_seconds_bucket{op="incr",le="+Inf"} 12
berth_op_duration_seconds_sum{op="incr"} 0.05
berth_op_duration_seconds_count{op="incr"} 12
berth_op_duration_seconds_bucket{op="get",le="0.001"} 5
berth_op_duration_seconds_bucket{op="get",le="0.01"} 5
berth_op_duration_seconds_bucket{op="get",le="+Inf"} 5
berth_op_duration_seconds_sum{op="get"} 0.001
berth_op_duration_seconds_count{op="get"} 5
not a line
"#;

    #[test]
    fn counters_are_summed_over_their_labels_and_by_one() {
        let s = Scrape::new(TEXT);
        assert_eq!(s.sum("berth_ops_total"), 17.0);
        assert_eq!(s.sum("berth_connections"), 3.0);
        assert_eq!(s.sum("berth_never_registered"), 0.0);
        let by = s.sum_by("berth_ops_total", "result");
        assert_eq!(by.get("ok"), Some(&15.0));
        assert_eq!(by.get("unavailable"), Some(&2.0));
    }

    #[test]
    fn label_values_with_escapes_and_separators_parse() {
        let odd = parse(TEXT)
            .into_iter()
            .find(|s| s.name == "berth_odd")
            .unwrap();
        assert_eq!(
            odd.label("why"),
            Some(r#"a "quoted" \ value, with } and ,"#)
        );
        assert_eq!(odd.value, 1.0);
    }

    #[test]
    fn a_histogram_sums_its_buckets_across_labels() {
        let h = Scrape::new(TEXT).histogram("berth_op_duration_seconds");
        assert_eq!(h.le, vec![0.001, 0.01]);
        assert_eq!(h.counts, vec![9.0, 17.0]);
        assert_eq!(h.count, 17.0);
        assert!((h.sum - 0.051).abs() < 1e-12);
        assert_eq!(Scrape::new("").histogram("x"), Histogram::default());
    }
}
