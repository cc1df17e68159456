//! Single-flight: concurrent callers asking for the same key share one execution.
//!
//! The work runs in its own task, so it completes (and fills the cache) even when every caller
//! that asked for it has gone away; a later caller then finds its result in the store.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

/// A map from key to in-flight work.
pub struct SingleFlight<K, V: Clone> {
    /// A std mutex: held only to look up or insert, never across an `.await`.
    map: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless the same key is already running, and returns its result. `None` if
    /// the work panicked. Cancel-safe: dropping the returned future leaves the work running.
    pub async fn run<F>(&self, key: K, work: F) -> Option<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let shared = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = map.get(&key) {
                s.clone()
            } else {
                let map2 = Arc::clone(&self.map);
                let key2 = key.clone();
                // The task removes its own entry; it cannot do so before the insert below,
                // because the insert happens under the lock it needs.
                let handle = tokio::spawn(async move {
                    let v = work.await;
                    map2.lock().unwrap_or_else(|e| e.into_inner()).remove(&key2);
                    v
                });
                let fut: BoxFuture<'static, Option<V>> = async move { handle.await.ok() }.boxed();
                let s = fut.shared();
                map.insert(key, s.clone());
                s
            }
        };
        shared.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf: Arc<SingleFlight<u32, u32>> = Arc::new(SingleFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..10 {
            let sf = sf.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                sf.run(1, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), Some(7));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Once finished, the key runs again.
        assert_eq!(sf.run(1, async { 8 }).await, Some(8));
    }
}
