//! The in-memory route table the proxy reads on every request: sandbox id (and `owner/name`)
//! to the current sandbox record. Written through by the manager on every change; lookups take
//! a read lock for a hash probe and an `Arc` clone, and no lock is ever held across `.await`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::model::Sandbox;

#[derive(Default)]
struct Table {
    by_id: HashMap<String, Arc<Sandbox>>,
    /// owner → name → id (nested so lookups need no key allocation).
    by_path: HashMap<String, HashMap<String, String>>,
}

#[derive(Default)]
pub struct Routes {
    table: RwLock<Table>,
}

impl Routes {
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.read().by_id.get(id).cloned()
    }

    pub fn get_by_path(&self, owner: &str, name: &str) -> Option<Arc<Sandbox>> {
        let t = self.read();
        let id = t.by_path.get(owner)?.get(name)?;
        t.by_id.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        let mut v: Vec<_> = self.read().by_id.values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// Inserts or replaces a sandbox's route.
    pub fn put(&self, sb: Sandbox) {
        let mut t = self.write();
        if let Some(name) = &sb.name {
            t.by_path
                .entry(sb.owner.clone())
                .or_default()
                .insert(name.clone(), sb.id.clone());
        }
        t.by_id.insert(sb.id.clone(), Arc::new(sb));
    }

    pub fn remove(&self, id: &str) {
        let mut t = self.write();
        if let Some(sb) = t.by_id.remove(id) {
            if let Some(name) = &sb.name {
                if let Some(names) = t.by_path.get_mut(&sb.owner) {
                    names.remove(name);
                    if names.is_empty() {
                        t.by_path.remove(&sb.owner);
                    }
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}
