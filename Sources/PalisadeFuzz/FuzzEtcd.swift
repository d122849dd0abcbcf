import Foundation
import PalisadeStore

/// Target "etcd": lines of etcd's watch stream and range answers (JSON
/// gateway), as a compromised or broken store could send them.
func fuzzEtcd(_ bytes: UnsafeBufferPointer<UInt8>) {
    let line = Array(bytes)
    _ = try? EtcdStore.watchEvents(line: line)
    if let obj = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] {
        _ = EtcdStore.rangeResult(obj)
    }
}
