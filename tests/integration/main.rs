//! Integration tests: real traffic through a real gateway on loopback.

mod support;

mod smoke {
    use super::support::{client, gateway, simple_config, upstream};

    #[tokio::test]
    async fn proxies_to_an_upstream() {
        let up = upstream::fixed(200, "hello").await;
        let gw = gateway(&simple_config(
            &[up.addr],
            "",
            "  - name: all\n    action: {proxy: {upstream: up}}\n",
        ))
        .await;
        let r = client::get(&gw.url("/anything")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello");
        assert!(r.header("x-request-id").is_some());
        assert_eq!(up.hits(), 1);
    }
}

mod access;
mod access_log;
mod admin_api;
mod aggregate;
mod auth_keys;
mod auth_methods;
mod balancing;
mod config_cli;
mod cors_validation;
mod grpc;
mod hardening_h2;
mod hardening_http;
mod http2;
mod http2_refusal;
mod introspection;
mod jwt;
mod lifecycle;
mod limits;
mod observability;
mod pool;
mod proxying;
mod quickstart;
mod ratelimit;
mod resilience;
mod routing;
mod shedding;
mod streaming;
mod tls;
mod tracing;
mod upgrade;
mod upgrades;
