import Glibc

/// A failed libbpf or bpf(2) call, naming what it was done to and the errno.
public struct BPFError: Error, CustomStringConvertible, Equatable {
    public let operation: String
    public let subject: String
    public let errno: Int32

    public init(_ operation: String, _ subject: String, errno: Int32) {
        self.operation = operation
        self.subject = subject
        self.errno = errno < 0 ? -errno : errno
    }

    public var description: String {
        "\(operation) \(subject): \(String(cString: strerror(errno))) (errno \(errno))"
    }

    /// libbpf returns -errno from most calls and sets errno on NULL returns.
    static func check(_ result: Int32, _ operation: String, _ subject: String) throws {
        if result < 0 { throw BPFError(operation, subject, errno: result == -1 ? Glibc.errno : result) }
    }
}
