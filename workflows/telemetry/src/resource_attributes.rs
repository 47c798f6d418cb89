//! `OTEL_RESOURCE_ATTRIBUTES`, read and written as the OpenTelemetry specification has it: comma-separated
//! `key=value` pairs, values percent-encoded (W3C Baggage's octets). The one parser: the library reads the variable
//! with it and the operator merges the user's value into the one it injects with it.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// What a value cannot hold as it is: what Baggage's `baggage-octet` leaves out, and `%` itself. `$`, `(` and `)`
/// stay, so the `$(VAR)` references Kubernetes expands in an environment value pass through.
const ENCODED: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b',').add(b';').add(b'\\').add(b'%');

/// The pairs of an `OTEL_RESOURCE_ATTRIBUTES` value, values decoded; a pair without `=` or with an empty key is
/// skipped, as the specification's SDKs skip it.
pub fn parse(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let key = key.trim();
            (!key.is_empty())
                .then(|| (key.to_string(), percent_decode_str(value.trim()).decode_utf8_lossy().into_owned()))
        })
        .collect()
}

/// An `OTEL_RESOURCE_ATTRIBUTES` value of `pairs`, values encoded.
pub fn format<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", k.as_ref(), utf8_percent_encode(v.as_ref(), ENCODED)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The value of `key` in an `OTEL_RESOURCE_ATTRIBUTES` value.
pub fn get(value: &str, key: &str) -> Option<String> {
    parse(value).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_percent_decoded_and_encoded_back() {
        let pairs = parse(" team = data%20platform ,bad,=x,note=a%2Cb%3Bc, k8s.pod.name=$(POD) ");
        assert_eq!(
            pairs,
            [
                ("team".to_string(), "data platform".to_string()),
                ("note".into(), "a,b;c".into()),
                ("k8s.pod.name".into(), "$(POD)".into()),
            ]
        );
        assert_eq!(format(&pairs), "team=data%20platform,note=a%2Cb%3Bc,k8s.pod.name=$(POD)");
        assert_eq!(parse(&format(&[("k", "100% = \"done\"")])), [("k".to_string(), "100% = \"done\"".to_string())]);
        assert_eq!(get("a=1,workflow.attempt=3", "workflow.attempt").as_deref(), Some("3"));
    }
}
