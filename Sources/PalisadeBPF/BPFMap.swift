import CLibbpf
import CShim
import Glibc

/// A kernel map by file descriptor: from a loaded object or from its pin.
/// Typed access goes through `TypedMap`, whose key and value types are the C
/// structs of palisade_shared.h; sizes are checked against the kernel's.
public final class BPFMap {
    public let fd: Int32
    public let name: String
    public let type: UInt32
    public let keySize: Int
    public let valueSize: Int
    public let maxEntries: Int
    public let id: UInt32
    private let ownsFD: Bool
    private let owner: AnyObject?

    init(borrowedFD fd: Int32, name: String, owner: AnyObject) throws {
        self.fd = fd
        self.ownsFD = false
        self.owner = owner
        (type, keySize, valueSize, maxEntries, id) = try BPFMap.info(fd: fd, name: name)
        self.name = name
    }

    /// Opens a pinned map (for example from the CLI while the agent is stopped).
    public init(pinnedAt path: String) throws {
        let fd = bpf_obj_get(path)
        if fd < 0 { throw BPFError("open pinned map", path, errno: Glibc.errno) }
        self.fd = fd
        self.ownsFD = true
        self.owner = nil
        let name = path.split(separator: "/").last.map(String.init) ?? path
        do {
            (type, keySize, valueSize, maxEntries, id) = try BPFMap.info(fd: fd, name: name)
        } catch {
            Glibc.close(fd)
            throw error
        }
        self.name = name
    }

    private static func info(fd: Int32, name: String) throws -> (UInt32, Int, Int, Int, UInt32) {
        var info = bpf_map_info()
        var len = UInt32(MemoryLayout<bpf_map_info>.size)
        try BPFError.check(bpf_obj_get_info_by_fd(fd, &info, &len), "map info", name)
        return (info.type, Int(info.key_size), Int(info.value_size), Int(info.max_entries), info.id)
    }

    deinit { if ownsFD { Glibc.close(fd) } }

    public var isPerCPU: Bool {
        [BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH]
            .map { $0.rawValue }.contains(type)
    }

    public func pin(at path: String) throws {
        try BPFError.check(bpf_obj_pin(fd, path), "pin map", "\(name) at \(path)")
    }

    // Raw byte access; TypedMap wraps these.

    func lookupRaw(_ key: UnsafeRawPointer, _ value: UnsafeMutableRawPointer) throws -> Bool {
        if bpf_map_lookup_elem(fd, key, value) == 0 { return true }
        let e = Glibc.errno
        if e == ENOENT { return false }
        throw BPFError("lookup in map", name, errno: e)
    }

    func updateRaw(_ key: UnsafeRawPointer, _ value: UnsafeRawPointer, flags: UInt64) throws {
        if bpf_map_update_elem(fd, key, value, flags) != 0 {
            let e = Glibc.errno
            throw BPFError(e == E2BIG || e == ENOSPC ? "update (map full)" : "update", name, errno: e)
        }
    }

    func deleteRaw(_ key: UnsafeRawPointer) throws -> Bool {
        if bpf_map_delete_elem(fd, key) == 0 { return true }
        let e = Glibc.errno
        if e == ENOENT { return false }
        throw BPFError("delete from map", name, errno: e)
    }

    /// Every (key, value) in batches of `chunk` with BPF_MAP_LOOKUP_BATCH:
    /// one syscall per chunk instead of two per entry. nil when the map type
    /// has no batch support (LPM tries, arrays of some kinds).
    public func entriesBatchRaw(chunk: Int = 4096) throws -> [([UInt8], [UInt8])]? {
        var out: [([UInt8], [UInt8])] = []
        var keys = [UInt8](repeating: 0, count: keySize * chunk)
        var values = [UInt8](repeating: 0, count: valueSize * chunk)
        var token = [UInt8](repeating: 0, count: max(keySize, 8))
        var first = true
        while true {
            var count = UInt32(chunk)
            var next = [UInt8](repeating: 0, count: token.count)
            let rc: Int32 = keys.withUnsafeMutableBytes { k in values.withUnsafeMutableBytes { v in next.withUnsafeMutableBytes { n in
                token.withUnsafeMutableBytes { t in
                    bpf_map_lookup_batch(fd, first ? nil : t.baseAddress, n.baseAddress, k.baseAddress, v.baseAddress, &count, nil)
                } } } }
            let e = rc == 0 ? 0 : Glibc.errno
            if rc != 0 && e != ENOENT {
                if first && (e == EINVAL || e == ENOTSUP || e == EOPNOTSUPP || e == ENOTSUPP_LINUX) { return nil }
                throw BPFError("batch lookup in map", name, errno: e)
            }
            for i in 0..<Int(count) {
                out.append((Array(keys[(i * keySize)..<((i + 1) * keySize)]), Array(values[(i * valueSize)..<((i + 1) * valueSize)])))
            }
            if rc != 0 { break }   // ENOENT: that was the last batch
            token = next
            first = false
        }
        return out
    }

    /// Deletes many keys with BPF_MAP_DELETE_BATCH (one syscall per 4096),
    /// falling back to one by one where batches are not supported. Keys
    /// already gone are not an error. Returns how many were deleted.
    public func deleteBatchRaw(_ keys: [[UInt8]]) throws -> Int {
        var deleted = 0
        var start = 0
        while start < keys.count {
            let chunk = keys[start..<min(keys.count, start + 4096)]
            var flat = chunk.flatMap { $0 }
            var count = UInt32(chunk.count)
            let rc = flat.withUnsafeMutableBytes { bpf_map_delete_batch(fd, $0.baseAddress, &count, nil) }
            if rc == 0 {
                deleted += Int(count)
            } else {
                // ENOENT stops a batch at the first missing key; finish key by key.
                deleted += Int(count)
                for k in chunk.dropFirst(Int(count)) {
                    if try k.withUnsafeBytes({ try deleteRaw($0.baseAddress!) }) { deleted += 1 }
                }
            }
            start += chunk.count
        }
        return deleted
    }

    /// All keys, in the kernel's iteration order.
    func keysRaw() throws -> [[UInt8]] {
        var keys: [[UInt8]] = []
        var current = [UInt8](repeating: 0, count: keySize)
        var next = [UInt8](repeating: 0, count: keySize)
        var first = true
        while true {
            let rc: Int32 = first
                ? next.withUnsafeMutableBytes { bpf_map_get_next_key(fd, nil, $0.baseAddress) }
                : current.withUnsafeBytes { c in next.withUnsafeMutableBytes { bpf_map_get_next_key(fd, c.baseAddress, $0.baseAddress) } }
            if rc != 0 {
                let e = Glibc.errno
                if e == ENOENT { break }
                throw BPFError("iterate map", name, errno: e)
            }
            keys.append(next)
            current = next
            first = false
            if keys.count > maxEntries * 2 { break } // entries churning under us; enough
        }
        return keys
    }
}

/// The kernel's ENOTSUPP (524), which libc does not name.
let ENOTSUPP_LINUX: Int32 = 524

/// Number of possible CPUs (per-CPU maps hold one value for each).
public let possibleCPUs: Int = Int(pal_num_possible_cpus())

/// Typed view of a map whose key and value are trivial C structs.
public struct TypedMap<Key, Value> {
    public let map: BPFMap

    public init(_ map: BPFMap) throws {
        let k = MemoryLayout<Key>.size, v = MemoryLayout<Value>.size
        guard map.keySize == k, map.valueSize == v else {
            throw BPFError("typed view of", "\(map.name): kernel key/value \(map.keySize)/\(map.valueSize) bytes, Swift \(k)/\(v)", errno: EINVAL)
        }
        self.map = map
    }

    private func zeroed<T>(_ type: T.Type) -> T {
        let p = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<T>.size, alignment: MemoryLayout<T>.alignment)
        defer { p.deallocate() }
        p.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
        return p.load(as: T.self)
    }

    public func lookup(_ key: Key) throws -> Value? {
        var k = key
        var v = zeroed(Value.self)
        let found = try withUnsafeBytes(of: &k) { kp in
            try withUnsafeMutableBytes(of: &v) { try map.lookupRaw(kp.baseAddress!, $0.baseAddress!) }
        }
        return found ? v : nil
    }

    public func update(_ key: Key, _ value: Value, flags: UInt64 = UInt64(BPF_ANY)) throws {
        var k = key, v = value
        try withUnsafeBytes(of: &k) { kp in
            try withUnsafeBytes(of: &v) { try map.updateRaw(kp.baseAddress!, $0.baseAddress!, flags: flags) }
        }
    }

    @discardableResult
    public func delete(_ key: Key) throws -> Bool {
        var k = key
        return try withUnsafeBytes(of: &k) { try map.deleteRaw($0.baseAddress!) }
    }

    /// Deletes many keys at once (batched); returns how many were deleted.
    @discardableResult
    public func delete(_ keys: [Key]) throws -> Int {
        try map.deleteBatchRaw(keys.map { k in withUnsafeBytes(of: k) { Array($0) } })
    }

    public func keys() throws -> [Key] {
        try map.keysRaw().map { bytes in bytes.withUnsafeBytes { $0.loadUnaligned(as: Key.self) } }
    }

    /// Every entry; batched where the map type allows, else key by key (an
    /// entry deleted while iterating is skipped).
    public func entries() throws -> [(key: Key, value: Value)] {
        if !map.isPerCPU, let batch = try map.entriesBatchRaw() {
            return batch.map { k, v in
                (k.withUnsafeBytes { $0.loadUnaligned(as: Key.self) }, v.withUnsafeBytes { $0.loadUnaligned(as: Value.self) })
            }
        }
        return try keys().compactMap { k in try lookup(k).map { (k, $0) } }
    }

    public var count: Int { get throws { try map.keysRaw().count } }
}

/// Typed view of a per-CPU map: one value per possible CPU.
public struct PerCPUMap<Key, Value> {
    public let map: BPFMap
    private let stride: Int

    public init(_ map: BPFMap) throws {
        guard map.isPerCPU, map.keySize == MemoryLayout<Key>.size, map.valueSize == MemoryLayout<Value>.size else {
            throw BPFError("per-CPU view of", map.name, errno: EINVAL)
        }
        self.map = map
        stride = (MemoryLayout<Value>.size + 7) & ~7
    }

    public func lookup(_ key: Key) throws -> [Value] {
        var k = key
        var buf = [UInt8](repeating: 0, count: stride * possibleCPUs)
        let found = try withUnsafeBytes(of: &k) { kp in
            try buf.withUnsafeMutableBytes { try map.lookupRaw(kp.baseAddress!, $0.baseAddress!) }
        }
        guard found else { return [] }
        return buf.withUnsafeBytes { raw in
            (0..<possibleCPUs).map { raw.loadUnaligned(fromByteOffset: $0 * stride, as: Value.self) }
        }
    }

    /// Writes the same value on every CPU (used to reset).
    public func updateAll(_ key: Key, _ value: Value) throws {
        var k = key, v = value
        var buf = [UInt8](repeating: 0, count: stride * possibleCPUs)
        buf.withUnsafeMutableBytes { raw in
            for cpu in 0..<possibleCPUs {
                withUnsafeBytes(of: &v) { raw.baseAddress!.advanced(by: cpu * stride).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            }
        }
        try withUnsafeBytes(of: &k) { kp in
            try buf.withUnsafeBytes { try map.updateRaw(kp.baseAddress!, $0.baseAddress!, flags: UInt64(BPF_ANY)) }
        }
    }
}
