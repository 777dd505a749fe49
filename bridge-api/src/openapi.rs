//! The OpenAPI document's frame: title, version, tags and the bearer security scheme. The paths
//! themselves come from the `#[utoipa::path]` attributes on the handlers (collected in
//! [`crate::openapi_document`]), so the document is generated from the code, never edited by hand.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Name of the security scheme every `/v1` operation requires.
pub const BEARER: &str = "bearer";

/// The static part of the document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "devgate bridge-api",
        description = "HTTP door to devgate: message devices, ask who is online, tail uplink. \
                       Every endpoint except /v1/openapi.json needs `Authorization: Bearer <token>`; \
                       a read-only token (--api-read-token) may call the GET endpoints only.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "messages", description = "Downlink to devices and uplink tails"),
        (name = "devices", description = "Presence, listing and disconnecting devices"),
        (name = "gateways", description = "Live gateway instances")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "One of the tokens configured with --api-token (everything) or \
                         --api-read-token (GET only)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document before the handlers' paths are added.
pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    // The crate version would make the committed document change on every release bump for no
    // API reason; the API version is the path prefix.
    doc.info.version = "v1".to_owned();
    doc
}
