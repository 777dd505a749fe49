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
