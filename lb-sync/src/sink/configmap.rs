//! The ConfigMap sink: the rendered text under one key of a ConfigMap, written with server-side
//! apply. An nginx ingress controller that consumes the key (NGINX Inc.'s `stream-snippets`)
//! reloads nginx itself.
//!
//! Server-side apply with one fixed field manager means lb-sync owns exactly that key: other
//! keys of the same ConfigMap, managed by people or Helm, are left alone, and `force` takes the
//! key back if someone edited it by hand. The controller re-applies the key every `resync`
//! even when its text did not change, since lb-sync cannot see such an edit or a removal (it
//! never reads the ConfigMap); an apply of identical content changes nothing on the server, so
//! the ingress controller does not reload for it.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};

use super::SinkError;

/// The field manager of every apply; RBAC needs only `patch` on the one ConfigMap (server-side
/// apply is a single PATCH; nothing is read first).
pub const FIELD_MANAGER: &str = "devgate-lb-sync";

/// A configured ConfigMap sink.
pub struct ConfigMapSink {
    api: Api<ConfigMap>,
    name: String,
    key: String,
    resync: Duration,
}

impl ConfigMapSink {
    /// Writes key `key` of ConfigMap `name` in `namespace`, again every `resync`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        key: &str,
        resync: Duration,
    ) -> Self {
        ConfigMapSink {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            key: key.to_owned(),
            resync,
        }
    }

    /// How often the key is applied again although unchanged.
    pub fn resync(&self) -> Duration {
        self.resync
    }

    /// Applies the key (creating the ConfigMap if needed).
    pub async fn apply(&mut self, text: &str) -> Result<(), SinkError> {
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": self.name },
            "data": { &self.key: text },
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
            .map_err(|source| SinkError::Kube {
                name: self.name.clone(),
                source,
            })
    }
}
