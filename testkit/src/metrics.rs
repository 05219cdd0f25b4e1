//! Reading a Prometheus text exposition (a node's `/metrics`).

/// The sum of every sample of metric `name` (any labels) in a Prometheus text
/// exposition; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric_labeled(text, name, "")
}

/// The sum of the samples of metric `name` whose labels contain `label`
/// (e.g. `reason="tls"`; "" for all); 0 when absent.
pub fn metric_labeled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name).is_some_and(|rest| {
                (rest.starts_with(' ') && label.is_empty())
                    || (rest.starts_with('{') && rest.contains(label))
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_by_name_and_label() {
        let text = "# TYPE a counter\na 2\na_total 5\nb{reason=\"tls\"} 1\nb{reason=\"mac\"} 3\n";
        assert_eq!(metric_sum(text, "a"), 2.0);
        assert_eq!(metric_sum(text, "b"), 4.0);
        assert_eq!(metric_labeled(text, "b", "reason=\"tls\""), 1.0);
        assert_eq!(metric_sum(text, "c"), 0.0);
    }
}
