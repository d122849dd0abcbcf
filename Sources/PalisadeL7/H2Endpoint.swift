import NIOCore
import NIOHPACK
import NIOHTTP2

/// One stream of either end of the HTTP/2 relay.
struct H2Stream {
    var sendWindow: Int
    var receiveWindow = H2Relay.streamWindow
    var localEnded = false
    var remoteEnded = false
    /// Frames waiting for the peer's windows (towards the workload, also
    /// for a place under its stream limit).
    var queue: [H2Outgoing] = []
    /// Body bytes still due by the received message's content-length.
    var contentLeft: Int?
    /// Towards the workload: its HEADERS went out (false while the stream
    /// waits past the workload's limit). The caller's streams are open.
    var opened = true
    /// Towards the workload: how far its response is, and whether it
    /// answers a HEAD (no body, whatever its content-length says).
    var response = H2ResponseState.awaitingHead
    var isHead = false
}

enum H2ResponseState { case awaitingHead, body, ended }

enum H2Outgoing {
    case headers(HPACKHeaders, endStream: Bool)
    /// `source`: the other side's stream whose windows get `credit` back
    /// once these bytes are written.
    case data(ByteBuffer, endStream: Bool, source: HTTP2StreamID?, credit: Int)
}

/// What both ends of the HTTP/2 relay do alike (RFC 9113): reading frames
/// and assembling header blocks, SETTINGS, PING, WINDOW_UPDATE, sending
/// within the peer's windows (frames wait per stream until they open),
/// gathering one tick's frames into one write, and a connection error's
/// GOAWAY. `H2CallerConnection` (the server end, facing whoever reaches
/// the port) and `H2WorkloadConnection` (the client end, towards the local
/// workload) override the rest.
class H2Endpoint: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    typealias Flag = H2Wire.Flag
    typealias Failure = H2Wire.ConnectionError

    /// Frames (HEADERS and CONTINUATIONs) one header block may take.
    static let maxHeaderFrames = 256

    let relay: H2Relay
    var context: ChannelHandlerContext?
    var reader = H2FrameReader(maxFrameSize: H2Relay.maxFrameSize)
    var writer = H2FrameWriter(allocator: H2Relay.allocator)
    var decoder: HPACKDecoder
    var streams: [Int32: H2Stream] = [:]
    var peerInitialWindow = 65_535
    var peerMaxFrameSize = 1 << 14
    var sendWindow = 65_535
    var receiveWindow = 65_535
    var failed = false
    private var sawSettings = false
    private var unflushed = false
    private var continuation: (stream: Int32, endStream: Bool, dependency: Int32?, block: ByteBuffer, frames: Int)?

    init(relay: H2Relay, decoderTableSize: Int) {
        self.relay = relay
        decoder = HPACKDecoder(allocator: H2Relay.allocator, maxDynamicTableSize: decoderTableSize,
                               maxHeaderListSize: H2Relay.maxHeaderListSize)
    }

    // MARK: what each end does its own way

    /// Reads bytes that come before the first frame; true once none remain.
    func readPrefix() throws -> Bool { true }
    /// DATA, PRIORITY, RST_STREAM and GOAWAY.
    func frame(_ type: H2Wire.FrameType, _ f: H2FrameReader.Frame) throws {}
    /// A whole header block (its stream is not 0).
    func headerBlock(_ stream: Int32, _ block: ByteBuffer, endStream: Bool, dependency: Int32?) throws {}
    func streamError(_ stream: Int32, _ code: HTTP2ErrorCode) {}
    /// A stream left (`reason`: the error that ended it); its queue is dropped.
    func closed(_ stream: Int32, _ s: H2Stream, reason: HTTP2ErrorCode?) {}
    /// Whether the peer may name `stream` in a WINDOW_UPDATE (not idle).
    func mayName(_ stream: Int32) -> Bool { true }
    /// Bytes written (or dropped): the other side's windows get `credit` back.
    func dataTaken(source: HTTP2StreamID, _ credit: Int, sent: Bool, streamOpen: Bool) {}
    func dataFrameSent() {}
    /// A SETTINGS or PING answer was queued.
    func answered() throws {}
    /// A setting this class does not apply itself.
    func setting(_ id: UInt16, _ value: UInt32) throws {}
    func settingsApplied() {}
    /// The last stream a connection error's GOAWAY names as processed.
    var lastProcessedStream: Int32 { 0 }
    func detached() {}

    // MARK: to the peer

    func sendHeaders(_ id: HTTP2StreamID, _ headers: HPACKHeaders, endStream: Bool) {
        enqueue(Int32(id), .headers(headers, endStream: endStream))
    }

    /// Body bytes, written as far as the peer's windows allow, the rest
    /// when they open; `source` gets `credit` back once they are written.
    func sendData(_ id: HTTP2StreamID, _ data: ByteBuffer, endStream: Bool, source: HTTP2StreamID?, credit: Int) {
        enqueue(Int32(id), .data(data, endStream: endStream, source: source, credit: credit))
    }

    /// Gives the peer `n` bytes of window (the connection's, and the
    /// stream's when one is named and the peer still sends on it).
    func windowUpdate(stream: HTTP2StreamID?, _ n: Int) {
        guard !failed, context != nil else { return }
        if let stream {
            let key = Int32(stream)
            guard let s = streams[key], !s.remoteEnded else { return }
            streams[key]!.receiveWindow += n
            writer.windowUpdate(key, n)
        } else {
            receiveWindow += n
            writer.windowUpdate(0, n)
        }
    }

    func flush() {
        guard let context else { return }
        emit()
        if unflushed {
            unflushed = false
            context.flush()
        }
    }

    // MARK: the channel
    // (Every ChannelInboundHandler method a subclass implements is declared
    // here: the protocol's witnesses are the base class's.)

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelActive(context: ChannelHandlerContext) { context.fireChannelActive() }

    func channelReadComplete(context: ChannelHandlerContext) {
        flush()
        context.fireChannelReadComplete()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        reader.append(unwrapInboundIn(data), allocator: context.channel.allocator)
        do {
            guard try readPrefix() else { return }
            while !failed, let f = try reader.next() {
                try read(f)
            }
        } catch let f as Failure {
            fail(f.code)
        } catch {
            fail(.internalError)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        detach()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) { detach() }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    private func detach() {
        detached()
        context = nil
        streams.removeAll()
        continuation = nil
        reader.reset()
    }

    // MARK: frames from the peer

    private func read(_ f: H2FrameReader.Frame) throws {
        if let c = continuation {
            guard f.type == H2Wire.FrameType.continuation.rawValue, f.stream == c.stream else { throw Failure(code: .protocolError) }
            var block = c.block
            var p = f.payload
            guard block.readableBytes + p.readableBytes <= H2Wire.maxHeaderBlock, c.frames < Self.maxHeaderFrames else {
                throw Failure(code: .enhanceYourCalm)
            }
            block.writeBuffer(&p)
            if f.flags & Flag.endHeaders != 0 {
                continuation = nil
                try headerBlock(c.stream, block, endStream: c.endStream, dependency: c.dependency)
            } else {
                continuation = (c.stream, c.endStream, c.dependency, block, c.frames + 1)
            }
            return
        }
        guard let type = H2Wire.FrameType(rawValue: f.type) else { return }   // unknown types are ignored
        // The peer's preface ends with its SETTINGS.
        guard sawSettings || (type == .settings && f.flags & Flag.ack == 0) else { throw Failure(code: .protocolError) }
        switch type {
        case .headers:
            guard f.stream != 0 else { throw Failure(code: .protocolError) }
            var p = try H2Wire.unpadded(f.flags, f.payload)
            var dependency: Int32?
            if f.flags & Flag.priority != 0 {
                guard let d = p.readInteger(as: UInt32.self), p.readInteger(as: UInt8.self) != nil else {
                    throw Failure(code: .frameSizeError)
                }
                dependency = Int32(bitPattern: d & 0x7FFF_FFFF)
            }
            if f.flags & Flag.endHeaders != 0 {
                try headerBlock(f.stream, p, endStream: f.flags & Flag.endStream != 0, dependency: dependency)
            } else {
                var block = H2Relay.allocator.buffer(capacity: p.readableBytes * 2)
                block.writeBuffer(&p)
                continuation = (f.stream, f.flags & Flag.endStream != 0, dependency, block, 1)
            }
        case .settings:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            if f.flags & Flag.ack != 0 {
                guard f.payload.readableBytes == 0 else { throw Failure(code: .frameSizeError) }
                return
            }
            guard f.payload.readableBytes % 6 == 0 else { throw Failure(code: .frameSizeError) }
            try settings(f.payload)
            sawSettings = true
            writer.frame(.settings, Flag.ack, 0) { _ in }
            try answered()
        case .ping:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 8 else { throw Failure(code: .frameSizeError) }
            if f.flags & Flag.ack == 0 {
                var p = f.payload
                writer.frame(.ping, Flag.ack, 0) { $0.writeBuffer(&p) }
                try answered()
            }
        case .windowUpdate:
            guard f.payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            let n = Int(f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF)
            try windowUpdate(from: f.stream, n)
        case .pushPromise:
            throw Failure(code: .protocolError)   // clients never push, and we announce ENABLE_PUSH 0
        case .continuation:
            throw Failure(code: .protocolError)   // none expected
        case .data, .priority, .rstStream, .goAway:
            try frame(type, f)
        }
    }

    private func settings(_ payload: ByteBuffer) throws {
        var p = payload
        while let id = p.readInteger(as: UInt16.self), let value = p.readInteger(as: UInt32.self) {
            switch id {
            case 0x1:   // HEADER_TABLE_SIZE: our encoder's table may not exceed it
                writer.encoder.peerTableSize(Int(value))
            case 0x2:
                guard value <= 1 else { throw Failure(code: .protocolError) }
            case 0x4:
                guard value <= UInt32(H2Wire.maxWindow) else { throw Failure(code: .flowControlError) }
                let delta = Int(value) - peerInitialWindow
                peerInitialWindow = Int(value)
                for key in Array(streams.keys) {
                    streams[key]!.sendWindow += delta
                    guard streams[key]!.sendWindow <= H2Wire.maxWindow else { throw Failure(code: .flowControlError) }
                }
                if delta > 0 { for key in Array(streams.keys) { drain(key) } }
            case 0x5:
                guard value >= 1 << 14, value < 1 << 24 else { throw Failure(code: .protocolError) }
                peerMaxFrameSize = Int(value)
            default:
                try setting(id, value)   // MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored
            }
        }
        settingsApplied()
    }

    func windowUpdate(from stream: Int32, _ n: Int) throws {
        if stream == 0 {
            guard n > 0 else { throw Failure(code: .protocolError) }
            sendWindow += n
            guard sendWindow <= H2Wire.maxWindow else { throw Failure(code: .flowControlError) }
            for key in Array(streams.keys) where !(streams[key]?.queue.isEmpty ?? true) { drain(key) }
            return
        }
        guard mayName(stream) else { throw Failure(code: .protocolError) }
        guard var s = streams[stream] else { return }
        guard n > 0 else { return streamError(stream, .protocolError) }
        s.sendWindow += n
        guard s.sendWindow <= H2Wire.maxWindow else { return streamError(stream, .flowControlError) }
        streams[stream] = s
        drain(stream)
    }

    /// A connection error: GOAWAY, then the connection (and the other
    /// side's with it) closes once it is written.
    func fail(_ code: HTTP2ErrorCode) {
        guard !failed, let context else { return }
        failed = true
        writer.goAway(last: lastProcessedStream, code)
        let written = context.eventLoop.makePromise(of: Void.self)
        emit(promise: written)
        context.flush()
        written.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    // MARK: sending

    func enqueue(_ stream: Int32, _ item: H2Outgoing) {
        guard streams[stream] != nil, !failed else { return drop([item]) }
        streams[stream]!.queue.append(item)
        drain(stream)
    }

    /// Writes what an open stream's queue holds as far as the windows allow.
    /// (The stream is found once per frame and changed in place, before
    /// anything is written: a copy of it held across the changes made its
    /// queue copy itself on every frame.)
    func drain(_ stream: Int32) {
        while !failed, context != nil, let i = streams.index(forKey: stream), streams.values[i].opened,
              let first = streams.values[i].queue.first {
            switch first {
            case .headers(let h, let endStream):
                streams.values[i].queue.removeFirst()
                streams.values[i].localEnded = endStream
                writer.headers(stream, h, endStream: endStream, maxFrameSize: peerMaxFrameSize)
            case .data(var d, let endStream, let source, let credit):
                let room = min(streams.values[i].sendWindow, sendWindow)
                let n = d.readableBytes
                // (An empty frame goes whatever the windows, which a
                // smaller INITIAL_WINDOW_SIZE can make negative.)
                if n > 0 {
                    if room <= 0 { return }
                    if n > room {
                        // Part of it now; the rest when the windows open.
                        let part = d.readSlice(length: room)!
                        streams.values[i].queue[0] = .data(d, endStream: endStream, source: source, credit: credit)
                        streams.values[i].sendWindow -= room
                        sendWindow -= room
                        writeData(stream, part, endStream: false, source: nil, credit: 0)
                        continue
                    }
                }
                streams.values[i].queue.removeFirst()
                streams.values[i].sendWindow -= n
                streams.values[i].localEnded = endStream
                sendWindow -= n
                writeData(stream, d, endStream: endStream, source: source, credit: credit)
            }
        }
        closeIfDone(stream)
    }

    func closeIfDone(_ stream: Int32) {
        guard let s = streams[stream], s.localEnded, s.remoteEnded, s.queue.isEmpty else { return }
        close(stream, reason: nil)
    }

    /// The stream leaves; what it still held is dropped.
    func close(_ stream: Int32, reason: HTTP2ErrorCode?) {
        guard let s = streams.removeValue(forKey: stream) else { return }
        drop(s.queue)
        closed(stream, s, reason: reason)
    }

    /// Frames that will not be sent: the other side's windows get their bytes back.
    func drop(_ items: [H2Outgoing]) {
        for case .data(_, _, let source?, let credit) in items {
            dataTaken(source: source, credit, sent: false, streamOpen: false)
        }
    }

    /// A DATA frame; with a `source`, the other side's bytes are given
    /// back at once while this channel takes more, else once written (the
    /// peer reads slower than the other side sends).
    private func writeData(_ stream: Int32, _ data: ByteBuffer, endStream: Bool, source: HTTP2StreamID?, credit: Int) {
        guard let context else { return }
        dataFrameSent()
        let large = writer.data(stream, data, endStream: endStream)
        guard let source, !context.channel.isWritable else {
            if let large {
                emit()
                context.write(wrapOutboundOut(large), promise: nil)
                unflushed = true
            }
            if let source { dataTaken(source: source, credit, sent: true, streamOpen: !endStream) }
            return
        }
        let written = context.eventLoop.makePromise(of: Void.self)
        if let large {
            emit()
            context.write(wrapOutboundOut(large), promise: written)
        } else {
            emit(promise: written)
        }
        unflushed = true
        written.futureResult.assumeIsolated().whenComplete { result in
            self.dataTaken(source: source, credit, sent: (try? result.get()) != nil, streamOpen: !endStream)
        }
    }

    /// Hands this tick's frames to the channel.
    private func emit(promise: EventLoopPromise<Void>? = nil) {
        guard let context else { promise?.fail(ChannelError.ioOnClosedChannel); return }
        guard let gathered = writer.take(allocator: context.channel.allocator) else {
            promise?.succeed()
            return
        }
        context.write(wrapOutboundOut(gathered), promise: promise)
        unflushed = true
    }
}
