// scripts/bench: answers Haraka's reverse-DNS hook (so it never queries DNS) and lets the
// loopback load generator relay (like a whitelisted client).
// With HARAKA_NODELAY=1 (the script's default) every socket Haraka opens or accepts gets
// TCP_NODELAY: as shipped, Haraka stalls ~45 ms per relayed message on Nagle + delayed ACK.
if (process.env.HARAKA_NODELAY === '1') {
    const net = require('node:net')
    const connect = net.Socket.prototype.connect
    net.Socket.prototype.connect = function (...args) {
        this.setNoDelay(true)
        return connect.apply(this, args)
    }
}

exports.hook_lookup_rdns = function (next, connection) {
    next(OK, 'localhost')
}

exports.hook_connect = function (next, connection) {
    if (process.env.HARAKA_NODELAY === '1' && connection.client && connection.client.setNoDelay) {
        connection.client.setNoDelay(true)
    }
    connection.relaying = true
    next()
}
