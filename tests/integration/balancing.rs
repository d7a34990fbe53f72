//! Load balancing through a real gateway: weighted round-robin (and its
//! smoothness), weighted random, least-request, consistent hashing on each
//! key kind (with the remap ratio when a target is removed), and hostname
//! targets.

use super::support::traffic::{self, get_with, load, weighted_config};
use super::support::{client, gateway, upstream};
use std::collections::HashMap;
use std::time::Duration;

/// An upstream that answers 200 with `label`, so a reply names its target.
async fn labeled(label: &'static str) -> upstream::TestUpstream {
    upstream::fixed(200, label).await
}

fn share(count: usize, total: usize) -> f64 {
    count as f64 / total as f64
}

#[tokio::test]
async fn weighted_round_robin_distributes_by_weight_within_5_percent() {
    let ups = [labeled("a").await, labeled("b").await, labeled("c").await];
    let weights = [1u32, 2, 3];
    let targets: Vec<_> = ups
        .iter()
        .zip(weights)
        .map(|(u, w)| (u.addr.to_string(), w))
        .collect();
    let gw = gateway(&weighted_config(&targets, "")).await;
    let n = 10_000;
    let seen = load(&gw.url("/rr"), n, 8).await;
    let total_w: u32 = weights.iter().sum();
    for (u, w) in ups.iter().zip(weights) {
        let expected = w as f64 / total_w as f64;
        let got = share(u.hits(), n);
        assert!(
            (got - expected).abs() <= 0.05 * expected,
            "weight {w}: share {got:.4}, expected {expected:.4} (±5%); {seen:?}"
        );
    }
    assert_eq!(ups.iter().map(|u| u.hits()).sum::<usize>(), n);
}

#[tokio::test]
async fn round_robin_is_smooth_not_bursty() {
    let heavy = labeled("heavy").await;
    let l1 = labeled("l1").await;
    let l2 = labeled("l2").await;
    let gw = gateway(&weighted_config(
        &[
            (heavy.addr.to_string(), 5),
            (l1.addr.to_string(), 1),
            (l2.addr.to_string(), 1),
        ],
        "",
    ))
    .await;
    let c = client::new();
    let mut order = Vec::new();
    for _ in 0..70 {
        let r = get_with(&c, &gw.url("/smooth"), &[]).await;
        assert_eq!(r.status, 200);
        order.push(r.text());
    }
    // A bursty weighted round-robin sends 5 in a row to `heavy` and then the
    // two light ones back to back. The smooth one (nginx's) interleaves:
    // heavy heavy l1 heavy l2 heavy heavy | heavy heavy l1 ...
    let mut run = 0;
    let mut longest = 0;
    for t in &order {
        run = if t == "heavy" { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    assert!(longest < 5, "longest burst {longest}: {order:?}");
    for pair in order.windows(2) {
        assert!(
            pair.contains(&"heavy".to_string()),
            "light targets back to back: {order:?}"
        );
    }
    // Every window of one full cycle (7) holds exactly the weights.
    for w in order.windows(7) {
        let count = |name: &str| w.iter().filter(|t| *t == name).count();
        assert_eq!(
            (count("heavy"), count("l1"), count("l2")),
            (5, 1, 1),
            "window {w:?}"
        );
    }
}

#[tokio::test]
async fn weighted_random_distributes_by_weight() {
    let ups = [labeled("a").await, labeled("b").await, labeled("c").await];
    let weights = [1u32, 2, 3];
    let targets: Vec<_> = ups
        .iter()
        .zip(weights)
        .map(|(u, w)| (u.addr.to_string(), w))
        .collect();
    let gw = gateway(&weighted_config(&targets, "    balance: random\n")).await;
    let n = 10_000;
    load(&gw.url("/random"), n, 8).await;
    let total_w: u32 = weights.iter().sum();
    for (u, w) in ups.iter().zip(weights) {
        let p = w as f64 / total_w as f64;
        let got = share(u.hits(), n);
        // ±5 percentage points (the requirement), and no worse than 5 standard
        // deviations of a fair draw, which is tighter (~±1.9 points for the
        // smallest weight) yet fails by chance less than once in a million.
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (got - p).abs() <= 0.05 && (got - p).abs() <= 5.0 * sigma,
            "weight {w}: share {got:.4}, expected {p:.4} (5σ = {:.4})",
            5.0 * sigma
        );
    }
    assert_eq!(ups.iter().map(|u| u.hits()).sum::<usize>(), n);
}

#[tokio::test]
async fn least_request_steers_traffic_away_from_a_slow_target() {
    let slow = upstream::slow(Duration::from_millis(200)).await;
    let fast1 = labeled("fast1").await;
    let fast2 = labeled("fast2").await;
    let gw = gateway(&weighted_config(
        &[
            (slow.addr.to_string(), 1),
            (fast1.addr.to_string(), 1),
            (fast2.addr.to_string(), 1),
        ],
        "    balance: least_request\n",
    ))
    .await;
    let n = 600;
    load(&gw.url("/lr"), n, 12).await;
    let slow_share = share(slow.hits(), n);
    // Round-robin would give it a third. Least-request only sends it the few
    // requests chosen before its first (slow) answer was observed.
    assert!(
        slow_share < 0.10,
        "slow target got {} of {n} (fast: {} + {})",
        slow.hits(),
        fast1.hits(),
        fast2.hits()
    );
    assert_eq!(slow.hits() + fast1.hits() + fast2.hits(), n);
}

#[tokio::test]
async fn least_request_prefers_the_lower_latency_target() {
    // No concurrency: in-flight counts stay at zero, so latency alone decides.
    let medium = upstream::slow(Duration::from_millis(100)).await;
    let quick = labeled("quick").await;
    let gw = gateway(&weighted_config(
        &[(medium.addr.to_string(), 1), (quick.addr.to_string(), 1)],
        "    balance: least_request\n",
    ))
    .await;
    let c = client::new();
    let n = 60;
    for _ in 0..n {
        assert_eq!(get_with(&c, &gw.url("/lat"), &[]).await.status, 200);
    }
    assert!(
        quick.hits() >= 54,
        "lower-latency target got {} of {n}, slower one {}",
        quick.hits(),
        medium.hits()
    );
}

/// Which labeled target answered each key, for `keys` sent with `header`.
async fn route_keys(
    url: &str,
    header: &str,
    keys: impl Iterator<Item = String>,
) -> Vec<(String, String)> {
    let c = client::new();
    let keys: Vec<String> = keys.collect();
    let mut tasks = Vec::new();
    for chunk in keys.chunks(keys.len().div_ceil(8).max(1)) {
        let chunk = chunk.to_vec();
        let c = c.clone();
        let url = url.to_string();
        let header = header.to_string();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for k in chunk {
                let r = get_with(&c, &url, &[(&header, &k)]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                out.push((k, r.text()));
            }
            out
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.expect("worker"));
    }
    out
}

#[tokio::test]
async fn consistent_hash_on_header_is_sticky_and_spread() {
    let ups = [labeled("0").await, labeled("1").await, labeled("2").await];
    let targets: Vec<_> = ups.iter().map(|u| (u.addr.to_string(), 1)).collect();
    let gw = gateway(&weighted_config(
        &targets,
        "    balance: consistent_hash\n    hash_on: header:x-user\n",
    ))
    .await;
    let keys = 600;
    let first = route_keys(
        &gw.url("/h"),
        "x-user",
        (0..keys).map(|k| format!("user-{k}")),
    )
    .await;
    let second = route_keys(
        &gw.url("/h"),
        "x-user",
        (0..keys).map(|k| format!("user-{k}")),
    )
    .await;
    let a: HashMap<_, _> = first.into_iter().collect();
    let b: HashMap<_, _> = second.into_iter().collect();
    for (k, t) in &a {
        assert_eq!(Some(t), b.get(k), "key {k} changed target");
    }
    let mut per: HashMap<&str, usize> = HashMap::new();
    for t in a.values() {
        *per.entry(t.as_str()).or_default() += 1;
    }
    for label in ["0", "1", "2"] {
        let s = share(per.get(label).copied().unwrap_or(0), keys);
        assert!(
            (0.20..=0.47).contains(&s),
            "target {label} owns {s:.3} of the keys: {per:?}"
        );
    }
}

#[tokio::test]
async fn consistent_hash_remaps_about_one_nth_when_a_target_is_removed() {
    let labels = ["0", "1", "2", "3", "4"];
    let mut ups = Vec::new();
    for l in labels {
        ups.push(labeled(l).await);
    }
    let extra = "    balance: consistent_hash\n    hash_on: header:x-key\n";
    let all: Vec<_> = ups.iter().map(|u| (u.addr.to_string(), 1)).collect();
    let removed = "2";
    let fewer: Vec<_> = ups
        .iter()
        .zip(labels)
        .filter(|(_, l)| *l != removed)
        .map(|(u, _)| (u.addr.to_string(), 1))
        .collect();
    let gw5 = gateway(&weighted_config(&all, extra)).await;
    let gw4 = gateway(&weighted_config(&fewer, extra)).await;
    let keys = 2_000;
    let before: HashMap<_, _> = route_keys(
        &gw5.url("/k"),
        "x-key",
        (0..keys).map(|k| format!("key-{k}")),
    )
    .await
    .into_iter()
    .collect();
    let after: HashMap<_, _> = route_keys(
        &gw4.url("/k"),
        "x-key",
        (0..keys).map(|k| format!("key-{k}")),
    )
    .await
    .into_iter()
    .collect();
    let mut moved = 0;
    for (k, t) in &before {
        let now = &after[k];
        assert_ne!(now, removed, "key {k} still on the removed target");
        if now != t {
            moved += 1;
            assert_eq!(
                t, removed,
                "key {k} moved from {t} to {now} although {t} is still there"
            );
        }
    }
    let ratio = share(moved, keys);
    assert!(
        (0.1..=0.3).contains(&ratio),
        "{moved} of {keys} keys moved ({ratio:.3}); about 1/5 expected"
    );
}

/// Sends each of `keys` twice through `send` and checks stickiness; returns
/// the number of distinct targets used.
async fn sticky_targets<F, Fut>(keys: usize, mut send: F) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = client::Reply>,
{
    let mut owner: HashMap<usize, String> = HashMap::new();
    for round in 0..2 {
        for k in 0..keys {
            let r = send(k).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let t = r.text();
            if round == 0 {
                owner.insert(k, t);
            } else {
                assert_eq!(owner[&k], t, "key {k} changed target");
            }
        }
    }
    let mut distinct: Vec<_> = owner.values().collect();
    distinct.sort();
    distinct.dedup();
    distinct.len()
}

#[tokio::test]
async fn consistent_hash_on_cookie() {
    let ups = [labeled("0").await, labeled("1").await, labeled("2").await];
    let targets: Vec<_> = ups.iter().map(|u| (u.addr.to_string(), 1)).collect();
    let gw = gateway(&weighted_config(
        &targets,
        "    balance: consistent_hash\n    hash_on: cookie:session\n",
    ))
    .await;
    let c = client::new();
    let url = gw.url("/c");
    let distinct = sticky_targets(60, |k| {
        let cookie = format!("theme=dark; session=s{k}; lang=en");
        let c = c.clone();
        let url = url.clone();
        async move { get_with(&c, &url, &[("cookie", &cookie)]).await }
    })
    .await;
    assert!(distinct >= 2, "60 sessions all on {distinct} target");
    // Another cookie changing does not move the session.
    let a = get_with(&c, &url, &[("cookie", "session=s7; theme=light")]).await;
    let b = get_with(&c, &url, &[("cookie", "lang=fr; session=s7")]).await;
    assert_eq!(a.text(), b.text());
}

#[tokio::test]
async fn consistent_hash_on_path() {
    let ups = [labeled("0").await, labeled("1").await, labeled("2").await];
    let targets: Vec<_> = ups.iter().map(|u| (u.addr.to_string(), 1)).collect();
    let gw = gateway(&weighted_config(
        &targets,
        "    balance: consistent_hash\n    hash_on: path\n",
    ))
    .await;
    let c = client::new();
    let gw = &gw;
    let distinct = sticky_targets(60, |k| {
        let c = c.clone();
        // The query string is not part of the key.
        let url = gw.url(&format!("/objects/{k}?v={}", k % 3));
        async move { get_with(&c, &url, &[]).await }
    })
    .await;
    assert!(distinct >= 2, "60 paths all on {distinct} target");
}

#[tokio::test]
async fn consistent_hash_on_client_ip() {
    let ups = [labeled("0").await, labeled("1").await, labeled("2").await];
    let mut t = String::new();
    for u in &ups {
        t.push_str(&format!("      - address: {}\n", u.addr));
    }
    // The client address comes from X-Forwarded-For because the peer
    // (loopback) is a trusted proxy: that gives many client IPs on loopback.
    let yaml = format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    trusted_proxies: [127.0.0.1/32]\nupstreams:\n  - name: up\n    balance: consistent_hash\n    hash_on: client_ip\n    targets:\n{t}routes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n"
    );
    let gw = gateway(&yaml).await;
    let c = client::new();
    let url = gw.url("/ip");
    let distinct = sticky_targets(60, |k| {
        let xff = format!("10.1.{}.{}", k / 200, k % 200 + 1);
        let c = c.clone();
        let url = url.clone();
        async move { get_with(&c, &url, &[("x-forwarded-for", &xff)]).await }
    })
    .await;
    assert!(distinct >= 2, "60 client IPs all on {distinct} target");

    // Without a forwarded address every request comes from 127.0.0.1 (the
    // listener does not trust others), so one target serves them all.
    let direct = gateway(&traffic::weighted_config(
        &ups.iter()
            .map(|u| (u.addr.to_string(), 1))
            .collect::<Vec<_>>(),
        "    balance: consistent_hash\n    hash_on: client_ip\n",
    ))
    .await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let r = get_with(&c, &direct.url("/ip"), &[("x-forwarded-for", "10.9.9.9")]).await;
        seen.push(r.text());
    }
    seen.dedup();
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[tokio::test]
async fn hostname_targets_are_resolved_and_served() {
    let up = upstream::echo().await;
    let authority = format!("localhost:{}", up.addr.port());
    let gw = gateway(&weighted_config(&[(authority.clone(), 1)], "")).await;
    let c = client::new();
    for _ in 0..20 {
        let r = get_with(&c, &gw.url("/named"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let doc = r.json();
        // The default upstream Host is the target as configured.
        assert_eq!(doc["headers"]["host"][0], authority.as_str());
    }
    assert_eq!(up.hits(), 20);
}

#[tokio::test]
async fn round_robin_spreads_an_ejected_targets_share_over_the_others() {
    let dead = upstream::closed_port().await;
    let a = labeled("a").await;
    let b = labeled("b").await;
    let c3 = labeled("c").await;
    let gw = gateway(&weighted_config(
        &[
            (dead.to_string(), 1),
            (a.addr.to_string(), 1),
            (b.addr.to_string(), 1),
            (c3.addr.to_string(), 1),
        ],
        "    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 1, base_ejection: 60s, max_ejection: 60s}\n",
    ))
    .await;
    let c = client::new();
    // The first request to the dead target fails and ejects it.
    let mut failed = 0;
    for _ in 0..4 {
        if get_with(&c, &gw.url("/e"), &[]).await.status != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 1);
    let before = [a.hits(), b.hits(), c3.hits()];
    let n = 3_000;
    for _ in 0..n {
        assert_eq!(get_with(&c, &gw.url("/e"), &[]).await.status, 200);
    }
    let got: Vec<usize> = [a.hits(), b.hits(), c3.hits()]
        .iter()
        .zip(before)
        .map(|(h, b)| h - b)
        .collect();
    // Each survivor gets a third, not the dead one's successor two thirds
    // (±0.02 is more than 4 standard deviations of the random part).
    for g in &got {
        let s = share(*g, n);
        assert!((s - 1.0 / 3.0).abs() <= 0.02, "{got:?}");
    }
}

#[tokio::test]
async fn consistent_hash_moves_only_an_ejected_targets_keys() {
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flaky = {
        let healthy = healthy.clone();
        upstream::start(move |_req| {
            let ok = healthy.load(std::sync::atomic::Ordering::SeqCst);
            async move { upstream::response(if ok { 200 } else { 500 }, "2") }
        })
        .await
    };
    let ups = [labeled("0").await, labeled("1").await];
    let targets = vec![
        (ups[0].addr.to_string(), 1),
        (ups[1].addr.to_string(), 1),
        (flaky.addr.to_string(), 1),
    ];
    let gw = gateway(&weighted_config(
        &targets,
        "    balance: consistent_hash\n    hash_on: header:x-key\n    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 1, base_ejection: 60s, max_ejection: 60s}\n",
    ))
    .await;
    let keys = || (0..300).map(|k| format!("k{k}"));
    let before: HashMap<_, _> = route_keys(&gw.url("/e"), "x-key", keys())
        .await
        .into_iter()
        .collect();
    let on_flaky = before
        .iter()
        .find(|(_, t)| *t == "2")
        .expect("a key on 2")
        .0;
    // It fails once and is ejected.
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let c = client::new();
    let r = get_with(&c, &gw.url("/e"), &[("x-key", on_flaky)]).await;
    assert_eq!(r.status, 500);
    let after: HashMap<_, _> = route_keys(&gw.url("/e"), "x-key", keys())
        .await
        .into_iter()
        .collect();
    let mut moved = 0;
    for (k, t) in &before {
        if t == "2" {
            assert_ne!(after[k], "2");
            moved += 1;
        } else {
            assert_eq!(&after[k], t, "key {k} on a healthy target moved");
        }
    }
    assert!(moved > 0);
}
