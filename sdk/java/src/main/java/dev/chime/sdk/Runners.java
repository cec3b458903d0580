// The pool of runner threads that run item handlers (fast handlers back to back, blocking ones in parallel).
package dev.chime.sdk;

import java.util.ArrayDeque;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Runs submitted tasks on long-lived runner threads, ported from the Python SDK's
 * runner pool: a runner takes tasks from a shared queue and runs them in turn; when it
 * takes one while more are waiting it wakes one more runner (or starts one), so
 * handlers that block get a thread each while handlers that return at once run back
 * to back on one thread, without a thread hand-off per delivery. The number of
 * threads is bounded by the tasks in flight (at most the credit).
 */
final class Runners {
    private final ArrayDeque<Runnable> queue = new ArrayDeque<>();
    private final String prefix;
    private final AtomicInteger names = new AtomicInteger();
    private int idle; // runners waiting for work
    private int permits; // wake-ups handed to waiting runners not taken yet
    private int waking; // runners woken or started that have not looked at the queue yet
    private boolean shut;

    Runners(String prefix) {
        this.prefix = prefix;
    }

    /** Queues {@code task}. */
    synchronized void submit(Runnable task) {
        if (shut) {
            return;
        }
        queue.addLast(task);
        if (waking == 0) {
            wakeLocked();
        }
    }

    private void wakeLocked() {
        waking++;
        if (idle - permits > 0) {
            permits++;
            notify();
        } else {
            Thread t = new Thread(this::runner, prefix + "-" + names.incrementAndGet());
            t.setDaemon(true);
            t.start();
        }
    }

    /** Stops the runners once their current task returns; queued tasks are dropped. */
    synchronized void shutdown() {
        shut = true;
        queue.clear();
        notifyAll();
    }

    private void runner() {
        boolean first = true;
        while (true) {
            Runnable task;
            synchronized (this) {
                if (first) {
                    waking--;
                    first = false;
                }
                while (queue.isEmpty()) {
                    if (shut) {
                        return;
                    }
                    idle++;
                    try {
                        while (permits == 0 && !shut) {
                            wait();
                        }
                    } catch (InterruptedException e) {
                        // a stale interrupt of a cancelled handler: keep serving
                    } finally {
                        idle--;
                    }
                    if (permits > 0) {
                        permits--;
                        waking--;
                    }
                }
                task = queue.pollFirst();
                if (!queue.isEmpty() && waking == 0) {
                    wakeLocked(); // more waiting: one more runner, in case this one blocks
                }
            }
            try {
                task.run();
            } catch (Throwable e) {
                // tasks report their own failures
            }
            Thread.interrupted();
        }
    }
}
