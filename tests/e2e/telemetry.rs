//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the CA and the sidecars export spans
//! over OTLP/gRPC, and a request's W3C trace context carries through both sidecars. The
//! receiver is a small OTLP collector inside the test, speaking the real protocol.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tonic::{Request, Response, Status};

use crate::mesh::{shop, via_proxy};
use crate::support::set_child_env;

/// (service.name, span name, trace id in hex)
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

struct Collector(Seen);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                seen.push((service.clone(), span.name, trace));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_the_trace_context_carries_through() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let collector = TraceServiceServer::new(Collector(seen.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(collector)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    set_child_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let s = shop(&[]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = via_proxy(
        s.frontend.outbound,
        "GET",
        "http://orders/orders",
        &[&format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01")],
    );
    assert_eq!(r.status, 200);

    let want = [
        ("meshid-ca", "x509_svid_issue", None),
        ("meshid-ca", "token_grant", None),
        ("meshid-sidecar", "outbound", Some(trace_id)),
        ("meshid-sidecar", "inbound", Some(trace_id)),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let missing: Vec<_> = {
            let seen = seen.lock().unwrap();
            want.iter()
                .filter(|(svc, name, trace)| {
                    !seen
                        .iter()
                        .any(|(s, n, t)| s == svc && n == name && trace.is_none_or(|id| t == id))
                })
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans not exported: {missing:?}; seen: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
