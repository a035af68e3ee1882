//! OpenTelemetry export: the binary's spans reach a real OTLP/gRPC receiver, join the caller's
//! W3C trace, cover the RPC, the use case and the database call, and never carry a secret.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

use crate::helpers::*;

/// An OTLP receiver (traces and metrics) that keeps every export it is sent.
#[derive(Clone, Default)]
pub struct Collector {
    pub exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    pub metric_exports: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metric_exports
            .lock()
            .unwrap()
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.exports.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Listens on a free port; returns the collector and its `http://` endpoint.
    pub async fn start() -> (Self, String) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .add_service(MetricsServiceServer::new(collector.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, endpoint)
    }

    /// The latest value of the monotonic sum `name` for each value of attribute `key`.
    pub fn counter(&self, name: &str, key: &str) -> std::collections::BTreeMap<String, i64> {
        let mut values = std::collections::BTreeMap::new();
        let exports = self.metric_exports.lock().unwrap();
        let metrics = exports
            .iter()
            .flat_map(|export| &export.resource_metrics)
            .flat_map(|resource| &resource.scope_metrics)
            .flat_map(|scope| &scope.metrics)
            .filter(|metric| metric.name == name);
        for metric in metrics {
            let Some(Data::Sum(sum)) = &metric.data else {
                panic!("{name} is not a sum");
            };
            assert!(sum.is_monotonic, "{name} is a counter");
            for point in &sum.data_points {
                let label = attribute(&point.attributes, key).unwrap_or_default();
                let value = match point.value {
                    Some(number_data_point::Value::AsInt(v)) => v,
                    other => panic!("{name}: unexpected value {other:?}"),
                };
                values.insert(label.to_owned(), value);
            }
        }
        values
    }

    /// Every export, traces and metrics, encoded, for secret scans.
    pub fn encoded(&self) -> Vec<Vec<u8>> {
        let traces = self.exports.lock().unwrap();
        let metrics = self.metric_exports.lock().unwrap();
        traces
            .iter()
            .map(Message::encode_to_vec)
            .chain(metrics.iter().map(Message::encode_to_vec))
            .collect()
    }

    pub fn spans(&self) -> Vec<Span> {
        self.exports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|export| &export.resource_spans)
            .flat_map(|resource| &resource.scope_spans)
            .flat_map(|scope| scope.spans.clone())
            .collect()
    }
}

/// Fails if any export holds one of `secrets` (or a JWT's signature). Proto strings are UTF-8
/// bytes, so a byte search finds any copy.
pub fn assert_no_secret(collector: &Collector, secrets: &[&str]) {
    let signatures = secrets
        .iter()
        .filter(|secret| secret.matches('.').count() == 2)
        .filter_map(|jwt| jwt.rsplit('.').next());
    let needles: Vec<&str> = secrets.iter().copied().chain(signatures).collect();
    for bytes in collector.encoded() {
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "a secret reached the collector"
            );
        }
    }
}

pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|value| match value {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn spans_reach_an_otlp_collector_in_the_callers_trace_without_secrets() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let (collector, otlp) = Collector::start().await;
    let pairs = settings_pairs(
        &db,
        &issuer,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let server = start_binary(&pairs).await;

    let jwt = issuer.token("agent-a", "alice");
    let access = "otel-access-3b8f1c55d2e64b1e";
    let refresh = "otel-refresh-9a41d0c2f7e3";
    let vault = server.client_with(&jwt).await;
    vault
        .store_token("jira", oauth_token(access, refresh, 3600), None)
        .await
        .unwrap();
    let mut request = tonic::Request::new(vault_client::proto::GetTokenRequest {
        tool: "jira".into(),
        min_valid_seconds: 0,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    let got = vault.raw().get_token(request).await.unwrap().into_inner();
    assert_eq!(got.token.unwrap().access_token, access);

    // SIGTERM: the server flushes its last spans before it exits.
    drop(vault);
    let status = server.terminate().await;
    assert!(status.success());

    let exports = collector.exports.lock().unwrap().clone();
    assert!(!exports.is_empty(), "no spans reached the collector");
    for export in &exports {
        for resource in &export.resource_spans {
            let attributes = &resource.resource.as_ref().unwrap().attributes;
            assert_eq!(attribute(attributes, "service.name"), Some("vault-server"));
        }
    }
    assert_no_secret(&collector, &[access, refresh, &jwt]);

    let spans = collector.spans();
    let named = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let get = named("vault.v1.CredentialVault/GetToken");
    assert_eq!(
        get.len(),
        1,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let get = get[0];
    assert_eq!(get.kind, SpanKind::Server as i32);
    assert_eq!(
        hex::encode(&get.trace_id),
        TRACE_ID,
        "joins the caller's trace"
    );
    assert_eq!(hex::encode(&get.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(attribute(&get.attributes, "rpc.system"), Some("grpc"));

    // The use case and its database read are children in the same trace.
    let in_get_trace = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.trace_id == get.trace_id)
            .unwrap_or_else(|| panic!("no {name} span in the GetToken trace"))
    };
    let use_case = in_get_trace("get_token");
    assert_eq!(use_case.parent_span_id, get.span_id);
    assert_eq!(attribute(&use_case.attributes, "agent"), Some("agent-a"));
    assert_eq!(attribute(&use_case.attributes, "tool"), Some("jira"));
    // The read: alone, or carrying the release's audit record with it.
    assert!(
        spans.iter().any(|s| s.trace_id == get.trace_id
            && (s.name == "load" || s.name == "load_releasing")),
        "no database read in the GetToken trace"
    );

    // StoreToken had no traceparent: a trace of its own, with its database write (the
    // generation and the row in one transaction).
    let store = named("vault.v1.CredentialVault/StoreToken");
    assert_eq!(store.len(), 1);
    assert_ne!(store[0].trace_id, get.trace_id);
    assert!(
        spans
            .iter()
            .any(|s| s.name == "upsert_next" && s.trace_id == store[0].trace_id)
    );
}

#[tokio::test]
async fn a_malformed_otlp_setting_stops_startup_naming_it() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let pairs = settings_pairs(
        &db,
        &issuer,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[not a host")],
    );
    let (ok, stderr) = run_binary_to_exit(&["serve"], &pairs);
    assert!(!ok);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{stderr}");
}
