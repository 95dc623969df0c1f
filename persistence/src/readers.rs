//! A pool of reader threads, each with its own connection. WAL lets them read committed data
//! while the writer writes.

use crate::StorageError;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

type ReadJob<R> = Box<dyn FnOnce(&R) + Send>;

pub struct Readers<R> {
    sender: Option<mpsc::Sender<ReadJob<R>>>,
    threads: Vec<JoinHandle<()>>,
}

impl<R: 'static> Readers<R> {
    /// Starts one thread per value `open` returns (each value owns a connection).
    pub fn start(
        name: &str,
        count: usize,
        open: impl Fn() -> Result<R, StorageError>,
    ) -> Result<Readers<R>, StorageError>
    where
        R: Send,
    {
        let (sender, receiver) = mpsc::channel::<ReadJob<R>>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut threads = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let reader = open()?;
            let receiver = Arc::clone(&receiver);
            let thread = std::thread::Builder::new()
                .name(format!("{name}-reader-{i}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(&reader),
                        Err(_) => return,
                    }
                })
                .expect("spawning a reader thread");
            threads.push(thread);
        }
        Ok(Readers { sender: Some(sender), threads })
    }

    pub fn submit(&self, job: impl FnOnce(&R) + Send + 'static) -> Result<(), StorageError> {
        let sender = self.sender.as_ref().ok_or(StorageError::Stopped)?;
        sender.send(Box::new(job)).map_err(|_| StorageError::Stopped)
    }
}

impl<R> Drop for Readers<R> {
    fn drop(&mut self) {
        self.sender = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
