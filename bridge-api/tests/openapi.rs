//! The committed `bridge-api/openapi.json` must be exactly what the code generates, so API
//! consumers reading the repository see the real API.

#[test]
fn committed_openapi_document_matches_the_code() {
    let generated = devgate_bridge_api::openapi_document()
        .to_pretty_json()
        .expect("the document serializes")
        + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with the code. Regenerate it with:\n  \
         cargo run -q -p devgate-bridge-api -- --print-openapi > bridge-api/openapi.json",
        path.display()
    );
}

#[test]
fn document_lists_every_endpoint_with_bearer_security() {
    let doc = serde_json::to_value(devgate_bridge_api::openapi_document()).expect("json");
    for (path, method) in [
        ("/v1/devices/{id}/messages", "post"),
        ("/v1/devices/{id}/messages", "get"),
        ("/v1/messages", "post"),
        ("/v1/devices/{id}", "get"),
        ("/v1/devices", "get"),
        ("/v1/devices/{id}/session", "delete"),
        ("/v1/gateways", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["security"][0]["bearer"].is_array());
}

#[test]
fn document_lists_the_error_statuses_handlers_can_return() {
    let doc = serde_json::to_value(devgate_bridge_api::openapi_document()).expect("json");
    // (path, method, statuses the handler can answer besides 200/202, 401 and 503)
    let cases: [(&str, &str, &[&str]); 7] = [
        (
            "/v1/devices/{id}/messages",
            "post",
            &["404", "413", "429", "500", "502", "504"],
        ),
        ("/v1/messages", "post", &["413", "504"]),
        ("/v1/devices/{id}/messages", "get", &["429", "500", "504"]),
        ("/v1/devices/{id}", "get", &["500", "502", "504"]),
        (
            "/v1/devices/{id}/session",
            "delete",
            &["404", "500", "502", "504"],
        ),
        ("/v1/devices", "get", &["500", "504"]),
        ("/v1/gateways", "get", &["500", "504"]),
    ];
    for (path, method, statuses) in cases {
        let responses = &doc["paths"][path][method]["responses"];
        for status in statuses.iter().chain(&["401", "503"]) {
            assert!(
                responses[*status].is_object(),
                "{method} {path} does not document {status}"
            );
        }
        // Every operation sits behind the request cap.
        let timeout = responses["504"]["description"].as_str().unwrap_or_default();
        assert!(
            timeout.contains("request_timeout"),
            "{method} {path}: 504 does not mention request_timeout: {timeout:?}"
        );
    }
    let bulk_200 = doc["paths"]["/v1/messages"]["post"]["responses"]["200"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(bulk_200.contains("deadline"), "{bulk_200}");
    let tail_429 = &doc["paths"]["/v1/devices/{id}/messages"]["get"]["responses"]["429"];
    assert!(
        tail_429["description"]
            .as_str()
            .is_some_and(|d| d.contains("too_many_tails")),
        "{tail_429}"
    );
    assert!(tail_429["headers"]["Retry-After"].is_object(), "{tail_429}");
}
