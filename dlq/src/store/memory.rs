//! The in-memory store, for tests, examples and the embedded default.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{
    AuditEntry, Depth, DlqStore, Filter, Page, PageRequest, StoreError, Transition, parse_cursor,
};
use crate::job::Job;
use crate::letter::{DeadLetter, FailureClass};

/// A [`DlqStore`] in memory. Cheap to clone; clones share the records.
/// Nothing survives the process.
#[derive(Debug, Clone, Default)]
pub struct MemoryDlqStore {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: i64,
    letters: BTreeMap<i64, DeadLetter>,
    by_id: HashMap<String, i64>,
    audit: Vec<AuditEntry>,
    jobs: BTreeMap<String, Job>,
}

impl MemoryDlqStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below is a single insert or replace, so a panic in
        // another thread cannot leave the maps half-updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every record, oldest first (a convenience for tests).
    pub fn all(&self) -> Vec<DeadLetter> {
        self.lock().letters.values().cloned().collect()
    }
}

#[async_trait::async_trait]
impl DlqStore for MemoryDlqStore {
    async fn put(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(seq) = state.by_id.get(&letter.id).copied()
            && let Some(existing) = state.letters.get_mut(&seq)
        {
            existing.merge(letter.clone());
            return Ok(());
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        state.by_id.insert(letter.id.clone(), seq);
        state.letters.insert(seq, letter.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let state = self.lock();
        Ok(state
            .by_id
            .get(id)
            .and_then(|seq| state.letters.get(seq))
            .cloned())
    }

    async fn list(
        &self,
        filter: &Filter,
        page: &PageRequest,
    ) -> Result<Page<DeadLetter>, StoreError> {
        let after = parse_cursor(page.cursor.as_deref())?.unwrap_or(0);
        let limit = page.clamped_limit() as usize;
        let state = self.lock();
        let mut items = Vec::new();
        let mut last = None;
        let mut more = false;
        for (seq, letter) in state.letters.range(after + 1..) {
            if !filter.matches(letter) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(letter.clone());
            last = Some(*seq);
        }
        Ok(Page::new(
            items,
            if more {
                last.map(|s| s.to_string())
            } else {
                None
            },
        ))
    }

    async fn count(&self, filter: &Filter) -> Result<u64, StoreError> {
        let state = self.lock();
        Ok(state.letters.values().filter(|l| filter.matches(l)).count() as u64)
    }

    async fn transition(
        &self,
        id: &str,
        transition: &Transition,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let mut state = self.lock();
        let Some(seq) = state.by_id.get(id).copied() else {
            return Ok(None);
        };
        let Some(letter) = state.letters.get_mut(&seq) else {
            return Ok(None);
        };
        Ok(transition.apply(letter).then(|| letter.clone()))
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut state = self.lock();
        match state.audit.iter_mut().find(|e| e.id == entry.id) {
            Some(existing) => *existing = entry.clone(),
            None => state.audit.push(entry.clone()),
        }
        Ok(())
    }

    async fn audit_log(&self, page: &PageRequest) -> Result<Page<AuditEntry>, StoreError> {
        // Cursor: the position (in append order) before which the next
        // page starts, so entries appended meanwhile do not shift pages.
        let state = self.lock();
        let len = state.audit.len();
        let end = parse_cursor(page.cursor.as_deref())?
            .map_or(len, |c| usize::try_from(c).unwrap_or(len).min(len));
        let start = end.saturating_sub(page.clamped_limit() as usize);
        let items: Vec<_> = state.audit[start..end].iter().rev().cloned().collect();
        Ok(Page::new(items, (start > 0).then(|| start.to_string())))
    }

    async fn depth(&self) -> Result<Vec<Depth>, StoreError> {
        let state = self.lock();
        let mut groups: BTreeMap<(String, String, String, FailureClass), Depth> = BTreeMap::new();
        for letter in state.letters.values().filter(|l| l.status.is_parked()) {
            let key = (
                letter.source.system.clone(),
                letter.source.topic.clone(),
                letter.source.group.clone(),
                letter.error.class,
            );
            let depth = groups.entry(key).or_insert_with(|| Depth {
                system: letter.source.system.clone(),
                topic: letter.source.topic.clone(),
                group: letter.source.group.clone(),
                class: letter.error.class,
                count: 0,
                oldest: letter.dead_lettered_at,
            });
            depth.count += 1;
            depth.oldest = depth.oldest.min(letter.dead_lettered_at);
        }
        Ok(groups.into_values().collect())
    }

    async fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.lock().jobs.insert(job.id.clone(), job.clone());
        Ok(())
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.lock().jobs.get(id).cloned())
    }

    async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        // Job ids are UUIDv7: their order is their creation order.
        Ok(self
            .lock()
            .jobs
            .values()
            .filter(|j| !j.finished)
            .take(super::MAX_PAGE_SIZE as usize)
            .cloned()
            .collect())
    }
}
