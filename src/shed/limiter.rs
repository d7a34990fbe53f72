//! `Limiter`: a concurrency limit with a bounded wait queue ordered by
//! priority — the gateway-wide `overload` limit and a route's `concurrency`.
//!
//! A request of class `c` may take a slot while fewer than `thresholds[c]`
//! (its share of `max`) are in flight and no request of its class or a
//! higher one is waiting. Otherwise it waits in its class's FIFO (if there
//! is room; when the queue is full, a higher-class arrival evicts the newest
//! waiter of the lowest class below it) for at most `queue_timeout`. A slot
//! that is released goes to the first waiter of the highest class whose
//! threshold admits it; the slot is handed over (counted in flight all
//! along), so a newcomer cannot overtake the queue.
//!
//! Cost: taking and releasing a slot while nobody waits is one
//! compare-and-swap and one subtraction on atomics. The queue itself is
//! behind a mutex taken only when a request must wait (the limit is full)
//! or a slot is released while requests wait, held for a push, a pop or a
//! removal and never across an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// No slot for its class and no room in the queue (or no queue).
    Rejected,
    /// It waited and a higher-priority request took its place in the queue.
    Evicted,
    /// It waited `queue_timeout` without getting a slot.
    Timeout,
}

impl Shed {
    pub const ALL: [Shed; 3] = [Shed::Rejected, Shed::Evicted, Shed::Timeout];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Rejected => "rejected",
            Shed::Evicted => "evicted",
            Shed::Timeout => "queue_timeout",
        }
    }
}

/// A limit's settings as compiled (compared to reuse a limiter across
/// reloads).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSpec {
    pub max: u32,
    /// Per priority class: in-flight count below which the class is
    /// admitted (non-increasing, each in `1..=max`).
    pub thresholds: Box<[u32]>,
    pub queue: u32,
    pub queue_timeout: Duration,
    /// Whole seconds, for `Retry-After`.
    pub retry_after: u64,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<()>,
}

struct Waiters {
    /// One FIFO per class, highest class first.
    by_class: Box<[VecDeque<Waiter>]>,
    len: u32,
    next_id: u64,
}

impl Waiters {
    /// The highest class with a waiter.
    fn first_class(&self) -> Option<usize> {
        self.by_class.iter().position(|q| !q.is_empty())
    }
}

pub struct Limiter {
    pub spec: LimitSpec,
    in_flight: AtomicU32,
    /// Mirror of `waiters.len` readable without the lock.
    queued: AtomicU32,
    waiters: Mutex<Waiters>,
}

/// What `Limiter::acquire` decided.
pub enum Admit {
    Now(Permit),
    /// Wait with [`Wait::wait`] (the request is in the queue).
    Queued(Wait),
    Shed(Shed),
}

impl Limiter {
    pub fn new(spec: LimitSpec) -> Limiter {
        let classes = spec.thresholds.len().max(1);
        Limiter {
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            waiters: Mutex::new(Waiters {
                by_class: (0..classes).map(|_| VecDeque::new()).collect(),
                len: 0,
                next_id: 0,
            }),
            spec,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }

    pub fn queued(&self) -> u32 {
        self.queued.load(SeqCst)
    }

    fn threshold(&self, class: usize) -> u32 {
        let t = &self.spec.thresholds;
        t.get(class).or(t.last()).copied().unwrap_or(self.spec.max)
    }

    /// One more in flight if fewer than `limit` are.
    fn try_take(&self, limit: u32) -> bool {
        let mut n = self.in_flight.load(SeqCst);
        while n < limit {
            match self
                .in_flight
                .compare_exchange_weak(n, n + 1, SeqCst, SeqCst)
            {
                Ok(_) => return true,
                Err(x) => n = x,
            }
        }
        false
    }

    /// A slot for a request of `class` now, a place in the queue, or a
    /// refusal.
    pub fn acquire(self: &Arc<Self>, class: u8) -> Admit {
        let class = usize::from(class).min(self.spec.thresholds.len().saturating_sub(1));
        if self.queued.load(SeqCst) == 0 && self.try_take(self.threshold(class)) {
            return Admit::Now(Permit(self.clone()));
        }
        if self.spec.queue == 0 {
            return Admit::Shed(Shed::Rejected);
        }
        self.enqueue(class)
    }

    #[inline(never)]
    fn enqueue(self: &Arc<Self>, class: usize) -> Admit {
        let mut w = self.lock();
        let ahead = w.first_class().is_some_and(|c| c <= class);
        if !ahead && self.try_take(self.threshold(class)) {
            return Admit::Now(Permit(self.clone()));
        }
        if w.len >= self.spec.queue {
            // Full: displace the newest waiter of the lowest class below.
            let victim = (class + 1..w.by_class.len())
                .rev()
                .find(|&c| !w.by_class[c].is_empty());
            match victim {
                Some(c) => {
                    // Dropping its sender tells it (`Shed::Evicted`).
                    w.by_class[c].pop_back();
                    w.len -= 1;
                }
                None => return Admit::Shed(Shed::Rejected),
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = w.next_id;
        w.next_id += 1;
        w.by_class[class].push_back(Waiter { id, tx });
        w.len += 1;
        self.queued.store(w.len, SeqCst);
        drop(w);
        // A slot released between the failed attempt and the push saw no
        // waiter: hand it out now.
        self.dispatch();
        Admit::Queued(Wait {
            limiter: self.clone(),
            id,
            class,
            rx: Some(rx),
            since: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A panic while holding it cannot leave the queue inconsistent
        // (each critical section is a single push, pop or removal).
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands free slots to waiters, highest class first.
    fn dispatch(&self) {
        let mut w = self.lock();
        while let Some(c) = w.first_class() {
            if !self.try_take(self.threshold(c)) {
                break;
            }
            let Some(waiter) = w.by_class[c].pop_front() else {
                break;
            };
            w.len -= 1;
            if waiter.tx.send(()).is_err() {
                // It gave up (cancelled) before it could be removed.
                self.in_flight.fetch_sub(1, SeqCst);
            }
        }
        self.queued.store(w.len, SeqCst);
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, SeqCst);
        if self.queued.load(SeqCst) > 0 {
            self.dispatch();
        }
    }

    /// Removes waiter `id` if it is still queued; `false` when it is not
    /// (granted or evicted meanwhile).
    fn remove(&self, class: usize, id: u64) -> bool {
        let mut w = self.lock();
        let Some(pos) = w.by_class[class].iter().position(|x| x.id == id) else {
            return false;
        };
        w.by_class[class].remove(pos);
        w.len -= 1;
        self.queued.store(w.len, SeqCst);
        true
    }
}

/// One slot of a [`Limiter`], released when dropped.
pub struct Permit(Arc<Limiter>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A request waiting in a [`Limiter`]'s queue. Dropping it (the client went
/// away) leaves the queue, or releases the slot it was just given.
pub struct Wait {
    limiter: Arc<Limiter>,
    id: u64,
    class: usize,
    rx: Option<oneshot::Receiver<()>>,
    since: Instant,
}

impl Wait {
    /// Waits for a slot, at most the limiter's `queue_timeout`. Also
    /// returns how long it waited.
    pub async fn wait(mut self) -> (Result<Permit, Shed>, Duration) {
        let timeout = self.limiter.spec.queue_timeout;
        let Some(rx) = self.rx.as_mut() else {
            return (Err(Shed::Evicted), Duration::ZERO);
        };
        let r = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => {
                self.rx = None;
                Ok(Permit(self.limiter.clone()))
            }
            Ok(Err(_)) => {
                self.rx = None;
                Err(Shed::Evicted)
            }
            Err(_) => match self.leave() {
                Some(p) => Ok(p),
                None => Err(Shed::Timeout),
            },
        };
        (r, self.since.elapsed())
    }

    /// Leaves the queue; the slot if one was granted meanwhile.
    fn leave(&mut self) -> Option<Permit> {
        let mut rx = self.rx.take()?;
        if self.limiter.remove(self.class, self.id) {
            return None;
        }
        rx.close();
        rx.try_recv().ok().map(|()| Permit(self.limiter.clone()))
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        // A granted slot nobody will use is released with the permit.
        drop(self.leave());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max: u32, thresholds: &[u32], queue: u32, timeout_ms: u64) -> Arc<Limiter> {
        Arc::new(Limiter::new(LimitSpec {
            max,
            thresholds: thresholds.into(),
            queue,
            queue_timeout: Duration::from_millis(timeout_ms),
            retry_after: 1,
        }))
    }

    fn now(a: Admit) -> Permit {
        match a {
            Admit::Now(p) => p,
            _ => panic!("expected a slot now"),
        }
    }

    fn queued(a: Admit) -> Wait {
        match a {
            Admit::Queued(w) => w,
            _ => panic!("expected to wait"),
        }
    }

    fn shed(a: Admit) -> Shed {
        match a {
            Admit::Shed(s) => s,
            _ => panic!("expected a refusal"),
        }
    }

    #[tokio::test]
    async fn limit_queue_and_refusal() {
        let l = limiter(2, &[2], 1, 10_000);
        let a = now(l.acquire(0));
        let _b = now(l.acquire(0));
        let w = queued(l.acquire(0));
        assert_eq!(shed(l.acquire(0)), Shed::Rejected);
        assert_eq!((l.in_flight(), l.queued()), (2, 1));
        drop(a);
        // The slot was handed over: still two in flight, nobody queued.
        assert_eq!((l.in_flight(), l.queued()), (2, 0));
        let (p, _) = w.wait().await;
        let p = p.expect("granted");
        drop(p);
        assert_eq!(l.in_flight(), 1);
    }

    #[tokio::test]
    async fn queue_timeout_leaves_the_queue() {
        let l = limiter(1, &[1], 4, 20);
        let _a = now(l.acquire(0));
        let w = queued(l.acquire(0));
        let (r, _) = w.wait().await;
        assert_eq!(r.err(), Some(Shed::Timeout));
        assert_eq!((l.in_flight(), l.queued()), (1, 0));
    }

    #[tokio::test]
    async fn no_queue_refuses_at_once() {
        let l = limiter(1, &[1], 0, 50);
        let _a = now(l.acquire(0));
        assert_eq!(shed(l.acquire(0)), Shed::Rejected);
    }

    #[tokio::test]
    async fn lower_classes_stop_at_their_share() {
        // max 4: class 0 up to 4, class 1 up to 2.
        let l = limiter(4, &[4, 2], 0, 50);
        let _p: Vec<Permit> = (0..2).map(|_| now(l.acquire(1))).collect();
        assert_eq!(shed(l.acquire(1)), Shed::Rejected);
        let _q: Vec<Permit> = (0..2).map(|_| now(l.acquire(0))).collect();
        assert_eq!(shed(l.acquire(0)), Shed::Rejected);
    }

    #[tokio::test]
    async fn the_queue_is_served_by_priority_and_high_evicts_low() {
        let l = limiter(1, &[1, 1], 2, 10_000);
        let a = now(l.acquire(0));
        let low1 = queued(l.acquire(1));
        let low2 = queued(l.acquire(1));
        // Full queue: a high-priority arrival evicts the newest low waiter.
        let high = queued(l.acquire(0));
        let (r, _) = low2.wait().await;
        assert_eq!(r.err(), Some(Shed::Evicted));
        // Another low one finds no room and nothing below it to evict.
        assert_eq!(shed(l.acquire(1)), Shed::Rejected);
        drop(a);
        // The high waiter got the slot, though the low one queued first.
        let (h, _) = high.wait().await;
        let h = h.expect("high first");
        assert_eq!(l.queued(), 1);
        drop(h);
        let (lo, _) = low1.wait().await;
        assert!(lo.is_ok());
    }

    #[tokio::test]
    async fn a_cancelled_waiter_gives_its_slot_on() {
        let l = limiter(1, &[1], 2, 10_000);
        let a = now(l.acquire(0));
        let gone = queued(l.acquire(0));
        let next = queued(l.acquire(0));
        drop(gone);
        assert_eq!(l.queued(), 1);
        drop(a);
        let (r, _) = next.wait().await;
        drop(r.expect("granted"));
        assert_eq!((l.in_flight(), l.queued()), (0, 0));
    }

    #[tokio::test]
    async fn many_tasks_never_exceed_the_limit() {
        let l = limiter(3, &[3], 1000, 10_000);
        let peak = Arc::new(AtomicU32::new(0));
        let now_in = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (l, peak, now_in) = (l.clone(), peak.clone(), now_in.clone());
            tasks.push(tokio::spawn(async move {
                let p = match l.acquire(0) {
                    Admit::Now(p) => p,
                    Admit::Queued(w) => w.wait().await.0.expect("no timeout"),
                    Admit::Shed(s) => panic!("{s:?}"),
                };
                let n = now_in.fetch_add(1, SeqCst) + 1;
                peak.fetch_max(n, SeqCst);
                tokio::task::yield_now().await;
                now_in.fetch_sub(1, SeqCst);
                drop(p);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak.load(SeqCst) <= 3);
        assert_eq!((l.in_flight(), l.queued()), (0, 0));
    }
}
