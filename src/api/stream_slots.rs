//! Who holds event streams open. A stream serves for long (up to `stream_lifetime_s`) and
//! holds a connection all that time, so streams are counted: at most
//! `max_streams_per_tenant` per tenant (one tenant cannot take what others need) and
//! `max_streams` in all, which is below `max_connections`, so the API, `/healthz` and every
//! tenant always have connections left. A stream over its tenant's cap is a 429, over the
//! server's a 503, both in the error envelope with a `Retry-After`; a stream's slot is given
//! back when it ends, however it ends (its body is dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::StreamLimits;
use crate::error::{ApiError, ApiResult};

/// Seconds a refused client is told to wait before it tries again.
const RETRY_AFTER_S: u64 = 5;

pub struct StreamSlots {
    limits: StreamLimits,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_tenant: HashMap<String, usize>,
}

/// One open stream's slot, held for as long as the stream lives.
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    tenant: String,
}

impl StreamSlots {
    pub fn new(limits: StreamLimits) -> Arc<StreamSlots> {
        Arc::new(StreamSlots { limits, open: Mutex::default() })
    }

    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// A slot for one more stream of `tenant`, or the refusal that says which cap is full.
    pub fn take(self: &Arc<Self>, tenant: &str) -> ApiResult<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.by_tenant.get(tenant).copied().unwrap_or(0);
        if mine >= self.limits.per_tenant {
            let msg = format!(
                "This API key's tenant has {mine} event streams open, the most it may (max_streams_per_tenant); close one, or reconnect with Last-Event-ID later."
            );
            return Err(ApiError::rate_limited(msg, RETRY_AFTER_S).code("too_many_streams"));
        }
        if open.total >= self.limits.max_open {
            let msg = format!("The server has {} event streams open, the most it serves (max_streams); reconnect with Last-Event-ID later.", open.total);
            return Err(ApiError::unavailable(msg).code("too_many_streams"));
        }
        open.total += 1;
        *open.by_tenant.entry(tenant.to_string()).or_default() += 1;
        Ok(StreamSlot { slots: self.clone(), tenant: tenant.to_string() })
    }

    /// Streams open now, in all.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_tenant.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.by_tenant.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tenants_and_the_server_are_capped_and_slots_come_back() {
        let slots = StreamSlots::new(StreamLimits { max_open: 3, per_tenant: 2, lifetime: Duration::from_secs(1) });
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        let e = slots.take("a").err().unwrap();
        assert_eq!((e.status.as_u16(), e.code.as_deref()), (429, Some("too_many_streams")));
        assert!(e.message.contains("max_streams_per_tenant"), "{}", e.message);
        let _b1 = slots.take("b").unwrap();
        let e = slots.take("c").err().unwrap();
        assert_eq!(e.status.as_u16(), 503, "the server's share of streams is full");
        assert!(e.message.contains("(max_streams)") && e.retry_after.is_some(), "{}", e.message);
        drop(a1);
        assert_eq!(slots.open(), 2);
        let _c1 = slots.take("c").expect("a slot given back is taken again");
        assert!(slots.take("a").is_err(), "the server is full again");
    }
}
