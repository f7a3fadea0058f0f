/// Locks a mutex whose holder may have panicked. Every value guarded with this helper is
/// kept consistent between statements, so the poison flag carries no information.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
