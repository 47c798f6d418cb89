//! Plain HTTP to the data-path backends on loopback.

use std::time::Duration;

/// GET `url` (plain HTTP on loopback): the status and the body, None when nothing answered within 10 s.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<hyper::body::Bytes>>();
    let uri: hyper::Uri = url.parse().ok()?;
    let exchange = async {
        let response = client.get(uri).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.ok()?
}

/// `base?key=value&...` with the values URL-encoded.
pub fn with_query(base: &str, params: &[(&str, &str)]) -> String {
    let query: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    format!("{base}?{query}")
}
