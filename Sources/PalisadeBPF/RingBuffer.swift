import CLibbpf
import CShim
import Foundation

/// Polls a ring buffer map on its own thread and hands each record's bytes
/// to a handler. The handler runs on that thread: it must be @Sendable.
public final class RingBuffer: @unchecked Sendable {
    public typealias Handler = @Sendable (UnsafeRawBufferPointer) -> Void

    private final class Box {
        let handler: Handler
        init(_ h: @escaping Handler) { handler = h }
    }

    private let rb: OpaquePointer
    private let box: Box
    private let stopLock = NSLock()
    private var stopped = false
    private var thread: Thread?

    public init(map: BPFMap, handler: @escaping Handler) throws {
        box = Box(handler)
        let ctx = Unmanaged.passUnretained(box).toOpaque()
        guard let rb = pal_ringbuf_new(map.fd, { ctx, data, size in
            guard let ctx, let data else { return 0 }
            let box = Unmanaged<Box>.fromOpaque(ctx).takeUnretainedValue()
            box.handler(UnsafeRawBufferPointer(start: data, count: size))
            return 0
        }, ctx) else {
            throw BPFError("open ring buffer", map.name, errno: errno)
        }
        self.rb = rb
    }

    /// Processes what is ready, waiting at most timeout; returns records seen.
    @discardableResult
    public func poll(timeoutMilliseconds: Int32) -> Int32 {
        ring_buffer__poll(rb, timeoutMilliseconds)
    }

    public func start() {
        let t = Thread { [self] in
            while !isStopped { _ = poll(timeoutMilliseconds: 200) }
        }
        t.name = "palisade-ringbuf"
        thread = t
        t.start()
    }

    private var isStopped: Bool { stopLock.lock(); defer { stopLock.unlock() }; return stopped }

    public func stop() {
        stopLock.lock(); stopped = true; stopLock.unlock()
    }

    deinit {
        stop()
        ring_buffer__free(rb)
    }
}
