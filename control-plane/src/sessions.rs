//! Sign-in sessions of the status page: a random id in an HttpOnly cookie,
//! mapped here to what the signed-in token may do. In memory only: a restart
//! signs everyone out.

use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;

/// How long a session lasts.
pub const SESSION_MS: u64 = 12 * 3600 * 1000;
/// Sessions held at most; signing in beyond it drops the oldest.
const MAX_SESSIONS: usize = 10_000;

/// What a signed-in operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Signed in with the admin token: may also change availability.
    Admin,
    /// Signed in with the status token: may look.
    ReadOnly,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, (Role, u64)>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Role, u64)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `role`; returns its id (32 hex digits).
    pub fn create(&self, role: Role, now_ms: u64) -> String {
        let mut b = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut b);
        let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let mut map = self.lock();
        map.retain(|_, (_, until)| *until > now_ms);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), (role, now_ms + SESSION_MS));
        id
    }

    /// The role of a live session.
    pub fn role(&self, id: &str, now_ms: u64) -> Option<Role> {
        self.lock()
            .get(id)
            .filter(|(_, until)| *until > now_ms)
            .map(|(r, _)| *r)
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_until_it_expires_or_is_removed() {
        let s = Sessions::default();
        let a = s.create(Role::Admin, 0);
        let r = s.create(Role::ReadOnly, 0);
        assert_ne!(a, r);
        assert_eq!(a.len(), 32);
        assert_eq!(s.role(&a, 1), Some(Role::Admin));
        assert_eq!(s.role(&r, 1), Some(Role::ReadOnly));
        assert_eq!(s.role(&a, SESSION_MS), None, "expired");
        s.remove(&r);
        assert_eq!(s.role(&r, 1), None);
        assert_eq!(s.role("not-a-session", 1), None);
    }
}
